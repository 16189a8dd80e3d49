"""The `specdec` command: profile (acceptance, speed, break-even), generate (streaming), kv-size.

Bad input (a missing file, an unknown proposer, a vocabulary mismatch, an empty prompt set) prints
one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from .devices import resolve_device
from .hub import resolve
from .resources import demo_dir, humaneval_path
from .validation import read_json

EXIT_USAGE = 2
# what a missing, truncated or mismatched checkpoint raises while transformers loads it
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8": 1}


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun (its environment), (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _join_torchrun(device: str) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on GPUs, gloo on CPUs) and
    pick this rank's GPU, so that the target loads tensor-parallel (transformers' tp_plan="auto")."""
    import torch.distributed as dist

    if _rank_world()[1] == 1 or dist.is_initialized():
        return
    gpus = torch.cuda.is_available() and device != "cpu"
    if gpus:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpus else "gloo")


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as e:
        raise CliError(f"--device {name}: {e}") from None


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every flag's help, unless the help already states its default in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


# argument -> the smallest valid value (None values are "not given")
_MINIMUMS = {
    "max_new_tokens": 1,
    "num_tokens": 1,
    "depth": 1,
    "top_k": 1,
    "total_tokens": 1,
    "limit": 1,
    "batch_size": 1,
    "max_prompt_tokens": 1,
    "seq_len": 1,
    "batch": 1,
    "layers": 1,
    "kv_heads": 1,
    "head_dim": 1,
    "max_nodes": 2,
}


def check_args(args) -> None:
    """Every numeric flag in range, the device present and the output writable, before any work."""
    for name, low in _MINIMUMS.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise CliError(f"--{name.replace('_', '-')} {value} must be >= {low}")
    if getattr(args, "temperature", 0) < 0:
        raise CliError(f"--temperature {args.temperature} must be >= 0 (0 means greedy)")
    top_p = getattr(args, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise CliError(f"--top-p {top_p} must be in (0, 1]")
    if getattr(args, "memory_gib", None) is not None and args.memory_gib < 0:
        raise CliError(f"--memory-gib {args.memory_gib} must be >= 0")
    if getattr(args, "device", None) is not None:
        _device(args.device)
    out = getattr(args, "out", None)
    if out is not None:
        # profile writes a folder, tune a file: find out now, not after the whole run
        folder = Path(out) if args.command == "profile" else Path(out).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".specdec-write-test-{os.getpid()}"  # per process: torchrun ranks check at once
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CliError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def load_target(path: str | None, dtype: str, device: str):
    """(model, tokenizer, resolved folder) of --target (default: the demo target); CliError on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        try:
            path = str(demo_dir() / "target")
        except FileNotFoundError as e:
            raise CliError(f"--target is required here: {e}") from None
    try:
        path = str(resolve(path))  # a folder, or a Hub id through huggingface_hub's cache
    except FileNotFoundError as e:
        raise CliError(f"--target {e}") from None
    if not (Path(path) / "config.json").is_file():
        raise CliError(f"--target {path}: no config.json there (expected a transformers model folder)")
    dev = _device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if _rank_world()[1] > 1:  # under torchrun: sharded the way transformers shards it
            _join_torchrun(device)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], tp_plan="auto").eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(dev).eval()
    except LOAD_ERRORS as e:  # missing / truncated weights, bad config
        raise _load_error("--target", path, e) from None
    return model, tok, path


def _load_error(flag: str, path, e: BaseException) -> CliError:
    text = str(e).strip()
    first = text.splitlines()[0] if text else "no message"
    return CliError(f"{flag} {path}: cannot load the model ({type(e).__name__}: {first})")


PROPOSER_NAMES = ("none", "ngram", "draft", "medusa", "eagle")


DEMO_HEADS = {"draft": ("draft", "draft"), "medusa": ("heads", "medusa"), "eagle": ("heads", "eagle")}


def check_proposer_args(args) -> None:
    """The cheap checks, before any model is loaded. Without --target, the demo models stand in
    (assets/demo), and so do their draft / Medusa / EAGLE checkpoints when no path is given."""
    name = args.proposer
    if getattr(args, "target", "") is None and name in DEMO_HEADS:
        field, folder = DEMO_HEADS[name]
        if getattr(args, field, None) is None:
            try:
                setattr(args, field, str(demo_dir() / folder))
            except FileNotFoundError:
                pass
    if name is not None and name not in PROPOSER_NAMES:
        raise CliError(f"unknown proposer {name!r}; choose one of {', '.join(PROPOSER_NAMES)}")
    for field in ("draft", "heads"):  # Hub ids become their cached snapshot folders
        value = getattr(args, field, None)
        if value is not None and name in (("draft",) if field == "draft" else ("medusa", "eagle")):
            try:
                setattr(args, field, str(resolve(value)))
            except FileNotFoundError as e:
                raise CliError(f"--{field} {e}") from None
    if name == "draft" and (not args.draft or not (Path(args.draft) / "config.json").is_file()):
        raise CliError(f"--proposer draft needs --draft PATH to a model folder (got {args.draft})")
    if name == "medusa" and (not args.heads or not (Path(args.heads) / "config.json").is_file()):
        raise CliError(f"--proposer medusa needs --heads PATH to a checkpoint folder (got {args.heads})")
    if name == "eagle" and (not args.heads or not (Path(args.heads) / "config.json").is_file()):
        raise CliError(f"--proposer eagle needs --heads PATH to an EAGLE checkpoint folder (got {args.heads})")


def make_proposer(args, target):
    import specdec

    check_proposer_args(args)
    name = args.proposer
    if name in (None, "none"):
        return None
    if name == "ngram":
        return specdec.Ngram(num_tokens=args.num_tokens)
    if name == "draft":
        from transformers import AutoModelForCausalLM

        if not args.draft or not (Path(args.draft) / "config.json").is_file():
            raise CliError(f"--proposer draft needs --draft PATH to a model folder (got {args.draft})")
        try:
            draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=target.dtype).to(target.device).eval()
        except LOAD_ERRORS as e:
            raise _load_error("--draft", args.draft, e) from None
        from specdec.proposers.draft_model import VOCAB_PADDING

        d_vocab, t_vocab = draft.get_output_embeddings().weight.shape[0], target.get_output_embeddings().weight.shape[0]
        if abs(d_vocab - t_vocab) > VOCAB_PADDING * max(d_vocab, t_vocab):  # padded matrices of one tokenizer pass
            raise CliError(f"draft vocabulary {d_vocab} != target vocabulary {t_vocab}")
        return specdec.DraftModel(draft, num_tokens=args.num_tokens)
    if name == "medusa":
        if not args.heads:
            raise CliError("--proposer medusa needs --heads PATH")
        try:
            return specdec.Medusa.from_pretrained(args.heads, tree=_tree(args.tree))
        except (FileNotFoundError, ValueError) as e:
            raise CliError(f"--heads {args.heads}: {e}") from None
    if name == "eagle":
        try:
            return specdec.Eagle.from_pretrained(
                args.heads,
                depth=args.depth,
                top_k=args.tree_top_k,
                total_tokens=args.total_tokens,
                chain=args.chain,
            )
        except (FileNotFoundError, ValueError) as e:
            raise CliError(f"--heads {args.heads}: {e}") from None
    raise CliError(f"unknown proposer {name!r}; choose one of {', '.join(PROPOSER_NAMES)}")


def _read_json(flag: str, path: Path):
    try:
        return read_json(path)
    except ValueError as e:
        raise CliError(f"{flag} {e}") from None


def _tree(spec: str | None):
    if spec is None:
        return None
    if spec.isdigit():
        return int(spec)
    path = Path(spec)
    if not path.is_file():
        raise CliError(f"--tree {spec}: neither a node count nor a file")
    data = _read_json("--tree", path)
    choices = data.get("choices") if isinstance(data, dict) else data
    if not isinstance(choices, list) or not all(isinstance(c, list) for c in choices):
        raise CliError(f'--tree {spec}: expected a list of choices or {{"choices": [[0], [1], [0, 0], ...]}}')
    return [tuple(c) for c in choices]


# ---------------------------------------------------------------------------------------------
# kv-size
# ---------------------------------------------------------------------------------------------


def kv_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x bytes."""
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per


def cmd_kv_size(args) -> dict:
    heads = weights = None
    if args.config:
        path = Path(args.config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise CliError(f"--config {args.config}: file not found")
        cfg = _read_json("--config", path)
        if not isinstance(cfg, dict):
            raise CliError(f"--config {path}: expected a JSON object (a transformers config.json)")
        layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        kv_heads = cfg.get("num_key_value_heads") or heads
        hidden = cfg.get("hidden_size", cfg.get("n_embd"))
        head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
        missing = [k for k, v in [("num_hidden_layers", layers), ("num_attention_heads", heads)] if not v]
        if missing or not head_dim:
            missing += [] if head_dim else ["head_dim or hidden_size"]
            raise CliError(f"--config {path}: lacks {', '.join(missing)}; or give --layers, --kv-heads, --head-dim")
        weights = _weight_bytes(path, DTYPES.get(args.dtype, torch.bfloat16))
    else:
        if None in (args.layers, args.kv_heads, args.head_dim):
            raise CliError("kv-size needs --config PATH or all of --layers, --kv-heads, --head-dim")
        layers, kv_heads, head_dim = args.layers, args.kv_heads, args.head_dim
    per = KV_BYTES[args.dtype]
    per_seq = kv_bytes(layers, kv_heads, head_dim, args.seq_len, per)
    out = {
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "kv_bytes_per_sequence": per_seq,
        "kv_bytes": per_seq * args.batch,
        "kv_bytes_8bit": kv_bytes(layers, kv_heads, head_dim, args.seq_len, 1) * args.batch,
    }
    if heads and heads != kv_heads:
        out["kv_bytes_without_gqa"] = kv_bytes(layers, heads, head_dim, args.seq_len, per) * args.batch
    if weights is not None:
        out["weight_bytes"] = weights
    if args.memory_gib is not None:
        free = args.memory_gib * 2**30 - (weights or 0)
        out["max_batch"] = max(0, int(free // per_seq))
    lines = [
        f"KV cache: 2 x {layers} layers x {kv_heads} KV heads x {head_dim} x {args.seq_len} tokens x "
        f"{per} bytes ({args.dtype}) = {per_seq:,} bytes per sequence, {out['kv_bytes']:,} for batch {args.batch}"
    ]
    if "kv_bytes_without_gqa" in out:
        lines.append(f"without GQA ({heads} KV heads): {out['kv_bytes_without_gqa']:,} bytes")
    lines.append(f"with an 8-bit KV cache: {out['kv_bytes_8bit']:,} bytes")
    if weights is not None:
        lines.append(f"weights: {weights:,} bytes ({args.dtype if args.dtype in DTYPES else 'bfloat16'})")
    if "max_batch" in out:
        lines.append(f"largest batch in {args.memory_gib} GiB: {out['max_batch']}")
    if not args.json:
        print("\n".join(lines))
    return out


def _weight_bytes(config_path: Path, dtype: torch.dtype) -> int | None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(config_path.parent)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # an unknown architecture: report the KV numbers only
        return None
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * size


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def cmd_generate(args) -> dict:
    from transformers import TextStreamer

    import specdec

    model, tok, _ = load_target(args.target, args.dtype, args.device)
    proposer = make_proposer(args, model)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise CliError("--prompt is empty")
    lead = _rank_world()[0] == 0  # under torchrun only rank 0 streams and prints
    streamer = None if args.json or not lead else TextStreamer(tok, skip_prompt=False)
    out = specdec.generate(model, ids, proposer=proposer, streamer=streamer, **_settings(args).generate_kwargs())
    s = out.stats
    if not args.json and lead:
        print(
            f"\n[{s.proposer}] {s.generated_tokens} tokens, tau {s.tau:.2f} (bonus included), acceptance "
            f"{s.acceptance_rate:.2f}, TPOT {s.tpot_ms:.1f} ms, {s.tokens_per_s:.1f} tokens/s",
            file=sys.stderr,
        )
    text = tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
    return {"text": text, **s.as_dict()}


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------


def cmd_profile(args) -> dict:
    model, tok, target = load_target(args.target, args.dtype, args.device)
    proposer = make_proposer(args, model)
    if proposer is None:
        raise CliError("profile compares speculation with plain decoding: pass --proposer")
    lead = _rank_world()[0] == 0  # under torchrun every rank decodes, rank 0 reports
    return _profile_and_write(args, model, tok, target, proposer, Path(args.out), show=not args.json and lead)


def _settings(args):
    from .profile import ProfileSettings

    return ProfileSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=getattr(args, "batch_size", 1),
        max_prompt_tokens=getattr(args, "max_prompt_tokens", 512),
    )


def _load_prompt_set(args):
    from .prompts import load_prompts

    if args.prompts is None:
        args.prompts = str(humaneval_path())
    try:
        return load_prompts(args.prompts, getattr(args, "category", None), args.limit)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None


def _profile_and_write(args, model, tok, target: str, proposer, out: Path, show: bool, options=None) -> dict:
    """profile() on --prompts, then report.json (paths, settings, versions, measurements) in out;
    with show, the plots, the table and a "wrote" line."""
    from .profile import profile

    prompts = _load_prompt_set(args)
    try:
        result = profile(model, tok, proposer, prompts, _settings(args), progress=show and not args.quiet)
    except ValueError as e:
        raise CliError(str(e)) from None
    rank, world = _rank_world()
    report = {
        "target": target,
        "prompts": str(Path(args.prompts).resolve()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "proposer_options": options or proposer_options(args),
        "versions": versions(),
        **result.as_dict(),
    }
    if world > 1:
        report["tensor_parallel"] = world
    if rank != 0:
        return report
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if show:
        _plots(report, out)
        _table(report)
        print(f"wrote {out / 'report.json'} and its plots")
    return report


def proposer_options(args) -> dict:
    """Every setting of the chosen proposer, as report.json records it."""
    name = args.proposer
    options = {
        "draft": {"draft": args.draft, "num_tokens": args.num_tokens},
        "ngram": {"num_tokens": args.num_tokens},
        "medusa": {"heads": args.heads, "tree": args.tree},
        "eagle": {
            "heads": args.heads,
            "depth": args.depth,
            "tree_top_k": args.tree_top_k,
            "total_tokens": args.total_tokens,
            "chain": args.chain,
        },  # fmt: skip
    }.get(name, {})
    return {"name": name, **options}


def versions() -> dict:
    import transformers

    import specdec

    out = {"specdec": specdec.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def _plots(report: dict, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # plotting is an extra: the report and the table do not need it
        print("plots skipped: matplotlib is not installed (pip install 'specdec[plots]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    context = (
        f"{report['proposer']} on {Path(str(report.get('target', 'target'))).name}, {report['device']}, "
        f"T={report['temperature']:g}, {report['num_prompts']} prompts"
    )

    def save(fig, ax, title: str, name: str) -> None:
        ax.set_title(f"{title}\n{context}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)

    depth = report["per_depth"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    d = range(1, len(depth["unconditional"]) + 1)
    ax.plot(d, depth["unconditional"], "o-", label="unconditional (accepted / steps)")
    ax.plot(d, depth["conditional"], "s--", label="conditional (given depth - 1)")
    ax.set(xlabel="draft depth", ylabel="acceptance", ylim=(0, 1.05), xticks=list(d))
    ax.legend(fontsize=7)
    save(fig, ax, "acceptance by depth", "acceptance_by_depth.png")

    rows = report["per_prompt"]
    x = [r.get("prompt", i) for i, r in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar(x, [r["tau"] for r in rows])
    ax.set(xlabel="prompt", ylabel="tau (bonus included)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, ax, "tau per prompt", "tau_per_prompt.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r["plain_tokens_per_s"] for r in rows], w, label="plain")
    ax.bar([i + w / 2 for i in x], [r["tokens_per_s"] for r in rows], w, label="speculative")
    ax.set(xlabel="prompt", ylabel="tokens/s")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    save(fig, ax, "tokens/s per prompt, same engine, same run", "tokens_per_s_per_prompt.png")

    hist = report["counters"]["accepted_length_histogram"]
    if hist:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        total = sum(hist)
        ax.bar(range(len(hist)), [n / total for n in hist])
        ax.set(xlabel="drafts accepted in a step", ylabel="share of steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        save(fig, ax, f"accepted length per step ({total} row-steps)", "accepted_length_histogram.png")

    # predicted speedup of a chain of k drafts over the per-token acceptance a, with break-even
    step = report["step_ms"]
    cost = (step["draft"] + step["verify"]) / step["plain"] if step["plain"] else 0.0
    k = max(1, round(report["counters"]["num_draft_tokens"] / max(report["counters"]["num_drafts"], 1)))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    grid = [i / 100 for i in range(100)]
    if cost > 0:
        ax.plot(grid, [sum(a**j for j in range(k + 1)) / cost for a in grid], label=f"predicted ({k} drafts a step)")
    ax.axhline(1.0, color="k", lw=0.8, label="break-even (plain decoding)")
    ax.axvline(report["break_even_acceptance"], color="k", lw=0.8, ls=":")
    ax.plot([report["acceptance_rate"]], [report["speedup"]], "o", color="C3", label="measured")
    ax.set(xlabel="per-token acceptance", ylabel="speedup", xlim=(0, 1))
    ax.legend(fontsize=7)
    save(fig, ax, "speedup: predicted vs measured", "speedup_vs_acceptance.png")

    cats = report["per_category"]
    if len(cats) > 1:  # one category would be a one-bar chart
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        ax.bar(list(cats), [c["speedup"] for c in cats.values()])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(ylabel="speedup")
        save(fig, ax, "speedup per category", "speedup_per_category.png")
    plt.close("all")


def _table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"specdec profile: {report['proposer']} on {report['num_prompts']} prompts ({report['device']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for name, value in [
        ("tau (tokens / target forward, bonus incl.)", f"{report['tau']:.2f}"),
        ("acceptance rate (accepted / drafted)", f"{report['acceptance_rate']:.2f}"),
        ("TTFT / TPOT (ms)", f"{report['ttft_ms']:.1f} / {report['tpot_ms']:.2f}"),
        ("tokens/s: speculative / plain", f"{report['tokens_per_s']:.1f} / {report['plain_tokens_per_s']:.1f}"),
        ("speedup: measured / predicted", f"{report['speedup']:.2f} / {report['predicted_speedup']:.2f}"),
        ("break-even acceptance", f"{report['break_even_acceptance']:.2f}"),
        ("greedy outputs identical", str(report["greedy_identical"])),
    ]:
        t.add_row(name, value)
    for c, v in report["per_category"].items():
        t.add_row(f"category {c}: tau / speedup", f"{v['tau']:.2f} / {v['speedup']:.2f}")
    Console().print(t)


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------


def measured_acceptance(per_choice: dict, min_offered: int = 3):
    """acceptance(depth, rank) from a Medusa profile's per-choice counts; (depth, rank) pairs seen
    fewer than min_offered times use the assumed table, scaled by how the seen ones compared to it."""
    from specdec.proposers.medusa import assumed_acceptance

    seen: dict[tuple[int, int], list[int]] = {}
    for key, v in per_choice.items():
        path = tuple(int(x) for x in key.split(","))
        d, r = len(path) - 1, path[-1]
        o, a = seen.get((d, r), [0, 0])
        seen[(d, r)] = [o + v["offered"], a + v["accepted"]]
    measured = {k: a / o for k, (o, a) in seen.items() if o >= min_offered}
    ratios = [m / assumed_acceptance(*k) for k, m in measured.items()]
    scale = sum(ratios) / len(ratios) if ratios else 1.0

    def acceptance(depth: int, rank: int) -> float:
        return measured.get((depth, rank), min(1.0, scale * assumed_acceptance(depth, rank)))

    return acceptance, measured


def cmd_tune(args) -> dict:
    import specdec
    from specdec.heads.medusa import load_medusa
    from specdec.proposers.medusa import default_choices, expected_accepted
    from specdec.tree import DEFAULT_NODE_BUCKETS

    if args.proposer == "eagle":
        return tune_eagle(args)
    if not args.report:
        raise CliError("tune --proposer medusa needs --report (a report.json of `specdec profile --proposer medusa`)")
    report_path = Path(args.report)
    if not report_path.is_file():
        raise CliError(f"--report {report_path}: file not found (run `specdec profile --proposer medusa` first)")
    report = _read_json("--report", report_path)
    if not isinstance(report, dict) or not isinstance(report.get("step_ms"), dict) or "draft" not in report["step_ms"]:
        raise CliError(f"--report {report_path} has no step_ms.draft: pass a report.json of `specdec profile`")
    if not report.get("per_choice"):
        raise CliError(f"--report {report_path} has no per-choice acceptance (profile a Medusa proposer)")
    check_proposer_args(argparse.Namespace(proposer="medusa", draft=None, heads=args.heads))
    model, tok, target = load_target(args.target, args.dtype, args.device)
    num_heads = load_medusa(
        args.heads, model.config.hidden_size, model.get_output_embeddings().weight.shape[0]
    ).config.num_heads
    acceptance, measured = measured_acceptance(report["per_choice"])
    sizes = [1] + [b for b in DEFAULT_NODE_BUCKETS if 2 <= b <= args.max_nodes]
    costs = specdec.Engine(model, None).step_costs(sizes)
    t_draft = report["step_ms"]["draft"] / 1e3
    candidates = []
    for size in sizes[1:]:
        choices = default_choices(size - 1, num_heads, acceptance=acceptance)
        tau = 1 + expected_accepted(choices, acceptance)
        candidates.append(
            {
                "nodes": size,
                "expected_tau": tau,
                "predicted_speedup": tau * costs[1] / (t_draft + costs[size]),
                "choices": choices,
            }
        )
    best = max(candidates, key=lambda c: c["predicted_speedup"])
    result = {
        "choices": [list(c) for c in best["choices"]],
        "nodes": best["nodes"],
        "expected_tau": best["expected_tau"],
        "predicted_speedup": best["predicted_speedup"],
        "verify_cost_ms": {n: 1e3 * t for n, t in costs.items()},
        "measured_acceptance": {f"{d},{r}": a for (d, r), a in sorted(measured.items())},
        "candidates": [{k: v for k, v in c.items() if k != "choices"} for c in candidates],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"tuned tree: {best['nodes']} nodes, expected tau {best['expected_tau']:.2f}, predicted speedup "
        f"{best['predicted_speedup']:.2f} -> {out}"
    )
    if best["predicted_speedup"] < 1:
        result["recommendation"] = "plain decoding: no tree is predicted to beat it"
        print("recommendation: plain decoding (no Medusa tree is predicted to beat it on this target)")
    if args.prompts:  # re-measure with the tuned tree
        proposer = specdec.Medusa.from_pretrained(args.heads, tree=[tuple(c) for c in best["choices"]])
        prof_out = Path(args.profile_out or out.parent / "tuned_profile")
        options = {"name": "medusa", "heads": args.heads, "tree": str(out)}
        remeasured = _profile_and_write(args, model, tok, target, proposer, prof_out, show=False, options=options)
        result["remeasured"] = {
            "tau": remeasured["tau"],
            "speedup": remeasured["speedup"],
            "report": str(prof_out / "report.json"),
        }
        out.write_text(json.dumps(result, indent=1))
    return result


def parse_grid(spec: str) -> list[tuple[int, int, int]]:
    """ "depth:top_k:total_tokens,..." -> settings; each must be a valid EAGLE-2 tree."""
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise CliError(f"--grid item {item!r} is not depth:top_k:total_tokens (three integers)")
        d, k, n = (int(p) for p in parts)
        pool = k + (d - 1) * k * k
        if d < 1 or k < 1 or not 1 <= n <= pool:
            raise CliError(f"--grid item {item!r}: need depth, top_k >= 1 and 1 <= total_tokens <= {pool}")
        out.append((d, k, n))
    return out


def tune_eagle(args) -> dict:
    """Measure every --grid setting with `profile` (plain and speculative decoding in the same run)
    and keep the one with the highest measured speedup."""
    import specdec

    grid = parse_grid(args.grid)
    if not args.prompts:
        raise CliError("tune --proposer eagle measures on prompts: pass --prompts")
    out = Path(args.out)
    model, tok, target = load_target(args.target, args.dtype, args.device)
    candidates = []
    for d, k, n in grid:
        try:
            proposer = specdec.Eagle.from_pretrained(args.heads, depth=d, top_k=k, total_tokens=n)
        except (FileNotFoundError, ValueError) as e:
            raise CliError(f"--heads {args.heads}: {e}") from None
        options = {"name": "eagle", "heads": args.heads, "depth": d, "tree_top_k": k, "total_tokens": n}
        prof_out = out.parent / f"{out.stem}_profiles" / f"d{d}_k{k}_n{n}"
        r = _profile_and_write(args, model, tok, target, proposer, prof_out, show=False, options=options)
        candidates.append(
            {"depth": d, "top_k": k, "total_tokens": n, "tau": r["tau"], "speedup": r["speedup"],
             "tokens_per_s": r["tokens_per_s"], "plain_tokens_per_s": r["plain_tokens_per_s"]}
        )  # fmt: skip
        print(f"depth {d} top_k {k} total_tokens {n}: tau {r['tau']:.2f}, speedup {r['speedup']:.2f}")
    best = max(candidates, key=lambda c: c["speedup"])
    result = {
        "best": {key: best[key] for key in ("depth", "top_k", "total_tokens")},
        "flags": f"--depth {best['depth']} --tree-top-k {best['top_k']} --total-tokens {best['total_tokens']}",
        "measured_on": str(args.prompts),
        "candidates": candidates,
        "conventions": {"speedup": "tokens/s with speculation / tokens/s of the same engine without it, same run"},
    }
    if best["speedup"] < 1:
        result["recommendation"] = "plain decoding: no setting beat it"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    verdict = "; recommendation: plain decoding (none beat it)" if best["speedup"] < 1 else ""
    print(f"best: {result['flags']} (tau {best['tau']:.2f}, speedup {best['speedup']:.2f}){verdict} -> {out}")
    return result


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (exactly plain decoding's tokens)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the model's config)")
    p.add_argument("--top-k", type=int, default=None, help="sampling top-k (default: the model's config, else 50)")
    p.add_argument("--seed", type=int, default=0, help="row b samples with seed + b")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="auto: the checkpoint's own dtype")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout instead")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="a transformers model folder or Hub id (default: the demo target)")
    p.add_argument("--proposer", help="none, ngram, draft, medusa or eagle")
    p.add_argument("--draft", help="draft: a model folder or Hub id with the target's tokenizer")
    p.add_argument("--heads", help="medusa / eagle: a checkpoint folder or Hub id")
    p.add_argument("--tree", help="medusa: a node count or a JSON file of choices (default: 32 nodes)")
    p.add_argument("--num-tokens", type=int, default=4, help="draft, ngram: drafts per step")
    p.add_argument("--depth", type=int, default=6, help="eagle: drafting steps (tree levels)")
    p.add_argument("--tree-top-k", type=int, default=10, help="eagle: EAGLE-2 expansion width")
    p.add_argument("--total-tokens", type=int, default=60, help="eagle: draft nodes kept per tree")
    p.add_argument("--chain", action="store_true", help="eagle: draft a chain of --depth tokens")
    _sampling(p)


def parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = _DefaultsHelp
    ap = argparse.ArgumentParser(
        prog="specdec", description="exact speculative decoding: profile, generate, tune, kv-size", formatter_class=fmt
    )
    ap.add_argument("--version", action="version", version=f"specdec {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a generation, then one stats line", formatter_class=fmt)
    _common(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    prof = sub.add_parser("profile", help="acceptance, speed and break-even on a prompt set", formatter_class=fmt)
    _common(prof)
    prof.add_argument(
        "--prompts", help="Spec-Bench question.jsonl, HumanEval .jsonl(.gz) or a prompt per line (default: HumanEval)"
    )
    prof.add_argument("--category", help="only prompts of this Spec-Bench category")
    prof.add_argument("--limit", type=int, help="only the first N prompts")
    prof.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    prof.add_argument("--max-prompt-tokens", type=int, default=512, help="keep the last N tokens of a prompt")
    prof.add_argument("--out", required=True, help="folder for report.json and the plots")
    prof.add_argument("--quiet", action="store_true", help="no progress bar")
    tune = sub.add_parser(
        "tune",
        help="Medusa: the tree that maximises predicted tokens/s, from a profile; EAGLE: measured tree sizes",
        formatter_class=fmt,
    )
    tune.add_argument("--proposer", choices=["medusa", "eagle"], default="medusa", help="what to tune")
    tune.add_argument("--report", help="medusa: report.json of `specdec profile --proposer medusa`")
    tune.add_argument("--target", required=True, help="a transformers model folder or Hub id")
    tune.add_argument("--heads", required=True, help="the Medusa / EAGLE checkpoint folder or Hub id")
    tune.add_argument("--out", required=True, help="medusa: the tree file (accepted by --tree); eagle: the results")
    tune.add_argument(
        "--grid",
        default="3:4:8,5:4:12,5:8:32,6:10:60",
        help="eagle: depth:tree_top_k:total_tokens settings to measure, comma-separated",
    )
    tune.add_argument("--max-nodes", type=int, default=64, help="medusa: the largest tree considered")
    tune.add_argument("--prompts", help="prompts to measure (eagle) or re-measure the tuned tree (medusa) on")
    tune.add_argument("--profile-out", help="medusa: folder of the re-measured profile")
    tune.add_argument("--limit", type=int, help="only the first N prompts")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    _sampling(tune)
    kv = sub.add_parser("kv-size", help="KV-cache bytes, weights and the largest batch that fits", formatter_class=fmt)
    kv.add_argument("--config", help="a config.json or model folder (instead of the three numbers below)")
    kv.add_argument("--layers", type=int, help="decoder layers")
    kv.add_argument("--kv-heads", type=int, help="KV heads")
    kv.add_argument("--head-dim", type=int, help="head size")
    kv.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    kv.add_argument("--batch", type=int, default=1, help="sequences")
    kv.add_argument("--dtype", choices=list(KV_BYTES), default="float16", help="KV element type")
    kv.add_argument("--memory-gib", type=float, help="report the largest batch that fits in this much memory")
    kv.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout instead")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for one-line errors and the stats line
    try:
        check_args(args)
        if hasattr(args, "proposer") and hasattr(args, "draft"):
            check_proposer_args(args)
        commands = {"generate": cmd_generate, "profile": cmd_profile, "kv-size": cmd_kv_size, "tune": cmd_tune}
        result = commands[args.command](args)
        if getattr(args, "json", False) and _rank_world()[0] == 0:
            summary = {k: v for k, v in result.items() if k != "per_prompt"} if isinstance(result, dict) else result
            print(json.dumps(summary, default=str))
    except CliError as e:
        print(f"specdec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as e:
        print(f"specdec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun: let the job exit
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
