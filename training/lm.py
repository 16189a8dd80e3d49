"""The reference-model recipe: `python -m specdec.training.lm size=demo out=assets/demo`.

No model hub is reachable here, so specdec trains its own target / draft pair on Python source code
and the Medusa and EAGLE heads on the target's own continuations, with the project's own trainers.
Stages (each is skipped when its output exists, so a rerun resumes):

corpus     the .py files of the running interpreter's standard library and installed packages,
           deduplicated by content, split train / held-out by a stable hash of the path relative to
           its root (`stdlib/...` or `site/...`)
tokenizer  byte-level BPE trained with `tokenizers`, saved as a transformers tokenizer
target     LlamaForCausalLM, trained with bf16 autocast on a GPU (fp32 on the CPU), saved with
draft      `save_pretrained` (safetensors) and a model card
distill    the target's greedy continuations of code snippets from the training files
medusa     Medusa-1 heads sharing the target's lm_head (v2 style: small)
eagle      an EAGLE-1/2 drafter, the checkpoint with the best held-out tau
eval       tau per proposer at temperature 0 and 1 on HumanEval prompts and held-out code files
           -> the model card (out/README.md) and out/eval.json
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shlex
import sys
import sysconfig
import time
from datetime import date
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

EOS = "<|endoftext|>"
STAGES = ("corpus", "tokenizer", "target", "draft", "distill", "medusa", "eagle", "eval")


def _log(msg: str) -> None:
    print(f"[lm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------


def source_roots() -> list[tuple[str, Path]]:
    """(name, folder) of the interpreter's standard library and package folders."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and all(p != r for _, r in roots):
            roots.append(("site", p))
    return roots


def held_out(relpath: str, fraction: float) -> bool:
    """A stable split: the first 8 bytes of sha256(relative path), as a fraction of 2**64 (another
    hash than the reading order's sha1, so that the held-out files are spread over it)."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def collect_corpus(max_bytes: int, max_file_bytes: int, held_out_fraction: float) -> dict:
    """Deduplicated .py sources -> {"train": [(relpath, text)], "held_out": [...], "stats": {...}}.

    Files are read in the order of sha1(relative path) (fixed, independent of the machine's folder
    layout) until max_bytes; a file whose content was seen already is skipped, as are files larger
    than max_file_bytes (generated tables) and non-UTF-8 files."""
    candidates = []
    for name, root in source_roots():
        for path in root.rglob("*.py"):
            rel = f"{name}/{path.relative_to(root).as_posix()}"
            candidates.append((hashlib.sha1(rel.encode()).hexdigest(), rel, path))
    candidates.sort()
    seen: set[str] = set()
    files, total, skipped, duplicates = [], 0, 0, 0
    for _, rel, path in candidates:
        if total >= max_bytes:
            break
        try:
            if not path.is_file() or path.stat().st_size > max_file_bytes:
                skipped += 1
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if not text.strip() or digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        files.append((rel, text))
        total += len(text)
    train = [f for f in files if not held_out(f[0], held_out_fraction)]
    held = [f for f in files if held_out(f[0], held_out_fraction)]
    if not train or not held:
        raise ValueError(
            f"corpus split {len(train)} train / {len(held)} held-out files: raise corpus.max_bytes ({max_bytes}) "
            f"or adjust corpus.held_out ({held_out_fraction})"
        )
    stats = dict(
        candidate_files=len(candidates),
        used_files=len(files),
        used_bytes=total,
        train_files=len(train),
        held_out_files=len(held),
        skipped_files=skipped,
        duplicate_or_empty_files=duplicates,
        roots=[f"{n}: {r}" for n, r in source_roots()],
        python=sys.version.split()[0],
    )
    return {"train": train, "held_out": held, "stats": stats}


# ---------------------------------------------------------------------------------------------
# tokenizer and token arrays
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE (tokenizers) -> a transformers PreTrainedTokenizerFast saved at out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.model_max_length = 4096
    fast.save_pretrained(out)
    return fast


def encode(tokenizer, texts: list[str], batch: int = 256) -> np.ndarray:
    """Every text's ids followed by EOS, concatenated -> uint16 (vocab < 65536)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    parts = []
    for i in tqdm(range(0, len(texts), batch), desc="tokenize", mininterval=10):
        for ids in tokenizer(texts[i : i + batch], add_special_tokens=False).input_ids:
            parts.append(np.asarray(ids + [eos], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------
# language models
# ---------------------------------------------------------------------------------------------


def llama_config(spec: DictConfig, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rms_norm_eps=1e-5,
    )


def _windows(tokens: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(length + 1)
    return tokens[idx.to(tokens.device)].long()


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, batch: int, length: int, batches: int, device) -> float:
    """Mean next-token cross-entropy (nats) over `batches` fixed random windows of the held-out tokens."""
    g = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    for _ in range(batches):
        w = _windows(tokens, batch, length, g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten()).item()
    model.train()
    return total / batches


def train_lm(spec: DictConfig, config, train_tokens: torch.Tensor, held_tokens: torch.Tensor, device, seed: int):
    """Train one LlamaForCausalLM on random windows; stops at spec.steps or spec.max_minutes (the
    cosine schedule follows whichever is further along). Returns (model, record)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    g = torch.Generator().manual_seed(seed)
    tokens = train_tokens.to(device)
    budget = spec.max_minutes * 60
    t0 = time.perf_counter()
    step, losses = 0, []
    bar = tqdm(total=spec.steps, desc=f"lm {n_params / 1e6:.1f}M", mininterval=10)
    while True:
        progress = max(step / spec.steps, (time.perf_counter() - t0) / budget)
        if progress >= 1.0:
            break
        warm = min(1.0, (step + 1) / spec.warmup_steps)
        lr = spec.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        w = _windows(tokens, spec.batch_size, spec.seq_len, g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % spec.log_every == 0:
            losses.append((step, loss.item()))
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            print(json.dumps({"step": step, "loss": round(losses[-1][1], 4), "lr": lr}), flush=True)
    bar.close()
    seconds = time.perf_counter() - t0
    held = held_out_loss(model, held_tokens, min(spec.batch_size, 16), spec.seq_len, spec.eval_batches, device)
    record = dict(
        parameters=n_params,
        steps=step,
        tokens_seen=step * spec.batch_size * spec.seq_len,
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        final_train_loss=round(float(np.mean([v for _, v in losses[-5:]])) if losses else loss.item(), 4),
        held_out_loss=round(held, 4),
        held_out_perplexity=round(math.exp(held), 3),
        train_seconds=round(seconds, 1),
        loss_curve=losses,
    )
    return model.eval(), record


def save_lm(model, tokenizer, out: Path, record: dict, meta: dict, name: str) -> None:
    """safetensors (bf16, sharded below the asset size limit) + tokenizer + model card + record."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if meta["save_dtype"] == "bfloat16" else torch.float32
    model.to(dtype).save_pretrained(out, max_shard_size=meta["max_shard_size"])
    model.float()
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({**record, **meta}, indent=1))
    (out / "README.md").write_text(lm_card(name, record, meta))


def _data_line(meta: dict) -> str:
    c = meta["corpus"]
    return (
        f"{c['train_files']} train / {c['held_out_files']} held-out .py files of Python {c['python']}'s standard "
        f"library and installed packages ({c['used_bytes'] / 1e6:.0f} MB), "
        f"{meta['train_tokens'] / 1e6:.1f} M train tokens"
    )


def lm_card(name: str, r: dict, meta: dict) -> str:
    return f"""# specdec reference model: {name}

A Llama-architecture causal LM trained from scratch by specdec's recipe (`specdec.training.lm`) on
Python source code. It exists so that speculative decoding can be measured offline; it is not a
useful code model.

| | |
| --- | --- |
| parameters | {r["parameters"] / 1e6:.2f} M |
| data | {_data_line(meta)} |
| tokenizer | byte-level BPE, vocabulary {meta["vocab_size"]} (`tokenizers`) |
| steps | {r["steps"]} x {r["batch_size"]} x {r["seq_len"]} tokens = {r["tokens_seen"] / 1e6:.0f} M tokens seen |
| final train loss | {r["final_train_loss"]} nats/token |
| held-out loss / perplexity | {r["held_out_loss"]} / {r["held_out_perplexity"]} |
| trained on | {meta["card"]}, {r["train_seconds"]:.0f} s, {meta["date"]} |
| saved as | {meta["save_dtype"]} safetensors |
| command | `{meta["command"]}` |

Load with `AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)` and
`AutoTokenizer.from_pretrained(path)`. License of the training data: the Python Software Foundation
License (standard library) and the licenses of the installed packages.
"""


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def distill_snippets(target, files: list[str], tokenizer, spec: DictConfig, device, seed: int) -> list[torch.Tensor]:
    """Prompts: `prompt_tokens` ids from a random place in random training files; continuations:
    the target's greedy output through specdec (batched). Returns prompt + continuation [L_i]."""
    import specdec

    g = np.random.default_rng(seed)
    prompts = []
    for i in g.permutation(len(files)):
        ids = tokenizer(files[i], add_special_tokens=False).input_ids
        if len(ids) <= spec.prompt_tokens:
            continue
        start = int(g.integers(0, len(ids) - spec.prompt_tokens))
        prompts.append(torch.tensor(ids[start : start + spec.prompt_tokens]))
        if len(prompts) == spec.num_sequences:
            break
    seqs = []
    for i in tqdm(range(0, len(prompts), spec.batch_size), desc="distill", mininterval=10):
        batch = torch.stack(prompts[i : i + spec.batch_size]).to(device)
        out = specdec.generate(target, batch, max_new_tokens=spec.new_tokens, eos_token_id=None)
        seqs += [s.cpu() for s in out]
    return seqs


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def humaneval_prompts(path: Path, limit: int) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:limit]


def held_out_prompts(files: list[str], tokenizer, n: int, length: int) -> list[str]:
    """The first `length` tokens of the first n held-out files long enough (decoded back to text)."""
    out = []
    for text in files:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > length:
            out.append(tokenizer.decode(ids[:length]))
        if len(out) == n:
            break
    return out


def make_proposers(root: Path, target, spec: DictConfig) -> dict:
    """name -> a function building the proposer on the demo folder's checkpoints."""
    from transformers import AutoModelForCausalLM

    import specdec

    def draft():
        d = AutoModelForCausalLM.from_pretrained(root / "draft", dtype=torch.float32).to(target.device).eval()
        return specdec.DraftModel(d, num_tokens=spec.draft_tokens)

    return {
        "draft": draft,
        "ngram": lambda: specdec.Ngram(num_tokens=spec.ngram_tokens),
        "medusa": lambda: specdec.Medusa.from_pretrained(root / "medusa", tree=spec.medusa_nodes),
        "eagle": lambda: specdec.Eagle.from_pretrained(
            root / "eagle", depth=spec.eagle_depth, top_k=spec.eagle_top_k, total_tokens=spec.eagle_total_tokens
        ),
    }


@torch.no_grad()
def evaluate(root: Path, tokenizer, prompt_sets: dict[str, list[str]], spec: DictConfig, device) -> dict:
    """tau and acceptance per proposer, temperature 0 and 1, on each prompt set (fp32)."""
    from transformers import AutoModelForCausalLM

    import specdec

    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32).to(device).eval()
    results = {}
    for set_name, texts in prompt_sets.items():
        enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        for name, make in make_proposers(root, target, spec).items():
            proposer = make()
            for temp in (0.0, 1.0):
                out = specdec.generate(  # one ragged batch; every row its own seed
                    target,
                    ids,
                    mask,
                    proposer=proposer,
                    max_new_tokens=spec.new_tokens,
                    do_sample=temp > 0,
                    temperature=temp if temp > 0 else None,
                    top_k=0,
                    seed=list(range(len(texts))),
                    eos_token_id=None,
                    return_dict_in_generate=True,
                )
                s = out.stats
                results[f"{set_name}/{name}/T{temp:g}"] = dict(
                    tau=round(s.tau, 3), acceptance_rate=round(s.acceptance_rate, 3), prompts=len(texts)
                )
                _log(f"eval {set_name} {name} T={temp:g}: tau {s.tau:.2f}, acceptance {s.acceptance_rate:.2f}")
    return results


def eval_card(results: dict, spec: DictConfig, meta: dict) -> str:
    sets = sorted({k.split("/")[0] for k in results})
    lines = [
        "## Speculative decoding with these models",
        "",
        f"Measured on {meta['card']}, {meta['date']}, fp32, all prompts in one ragged batch, "
        f"{spec.new_tokens} new tokens per prompt "
        "(EOS ignored), seeds 0..n-1. tau = tokens per target forward, bonus included; acceptance = "
        "accepted / drafted tokens.",
        f"Proposers: draft = DraftModel({spec.draft_tokens}), ngram = Ngram({spec.ngram_tokens}), "
        f"medusa = Medusa(tree={spec.medusa_nodes}), eagle = Eagle(depth={spec.eagle_depth}, "
        f"top_k={spec.eagle_top_k}, total_tokens={spec.eagle_total_tokens}).",
        "",
        "| prompts | proposer | tau T=0 | acceptance T=0 | tau T=1 | acceptance T=1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in sets:
        for name in ("draft", "ngram", "medusa", "eagle"):
            a, b = results.get(f"{s}/{name}/T0"), results.get(f"{s}/{name}/T1")
            if a and b:
                n = a["prompts"]
                lines.append(
                    f"| {s} ({n}) | {name} | {a['tau']:.2f} | {a['acceptance_rate']:.2f} | "
                    f"{b['tau']:.2f} | {b['acceptance_rate']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def write_card(out: Path, name: str, results: dict, ev: DictConfig, meta: dict, size: DictConfig) -> None:
    """out/README.md: what each folder is, how it was trained, and the evaluation table."""
    rec = {m: json.loads((out / m / "training.json").read_text()) for m in ("target", "draft")}
    sel = out / "eagle" / "selection.json"
    selection = json.loads(sel.read_text()) if sel.exists() else {}
    best = max(selection, key=selection.get) if selection else "?"
    d, h, e = size.distill, size.medusa, size.eagle
    lines = [
        f"# specdec {name} models",
        "",
        "Trained from scratch by specdec's own recipe, `python -m specdec.training.lm size="
        f"{name}` (training records: each folder's README.md and training.json; the command that made them: "
        f"`{rec['target']['command']}`).",
        "",
        "| folder | what | training |",
        "| --- | --- | --- |",
        f"| target/ | Llama, {rec['target']['parameters'] / 1e6:.2f} M parameters, with the tokenizer (byte-level "
        f"BPE, {meta['vocab_size']} tokens) | {rec['target']['tokens_seen'] / 1e6:.0f} M tokens of Python source, "
        f"held-out perplexity {rec['target']['held_out_perplexity']} |",
        f"| draft/ | Llama, {rec['draft']['parameters'] / 1e6:.2f} M parameters, same tokenizer | "
        f"{rec['draft']['tokens_seen'] / 1e6:.0f} M tokens, "
        f"held-out perplexity {rec['draft']['held_out_perplexity']} |",
        f"| medusa/ | {h.num_heads} Medusa-1 heads ({h.num_layers} residual block each) sharing the target's lm_head | "
        f"{h.steps} steps x {h.batch_size} sequences of the target's greedy continuations "
        f"({d.num_sequences} snippets: {d.prompt_tokens} prompt + {d.new_tokens} generated tokens) |",
        f"| eagle/ | an EAGLE-1/2 drafter (one decoder layer, the target's lm_head) | {e.steps} steps x "
        f"{e.batch_size} of the same continuations; kept: {best} by held-out greedy tau (selection.json) |",
        "",
        f"Data: {meta['corpus']['train_files']} train / {meta['corpus']['held_out_files']} held-out .py files of "
        f"Python {meta['corpus']['python']}'s standard library and installed packages (split by a hash of the path).",
        "",
        eval_card(results, ev, meta),
    ]
    (out / "README.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..heads.medusa import MedusaConfig, MedusaHeads
    from .data import load_sequences, save_sequences
    from .eagle_trainer import EagleTrainConfig, train_eagle
    from .medusa_trainer import TrainConfig, train_medusa
    from .train import eagle_drafter

    stages = list(cfg.stages) if cfg.stages else list(STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    out = Path(cfg.out)
    work = Path(cfg.work) if cfg.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))  # fmt: skip
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    size = cfg.size
    command = "python -m specdec.training.lm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = dict(card=device_name(device), date=date.today().isoformat(), command=command,
                save_dtype=size.save_dtype, max_shard_size=size.max_shard_size)  # fmt: skip

    corpus_file = work / "corpus.json.gz"
    if "corpus" in stages and not corpus_file.exists():
        _log("collecting the corpus")
        corpus = collect_corpus(int(size.corpus.max_bytes), int(size.corpus.max_file_bytes), size.corpus.held_out)
        with gzip.open(corpus_file, "wt") as f:
            json.dump(corpus, f)
        _log(f"corpus: {corpus['stats']}")
    with gzip.open(corpus_file, "rt") as f:
        corpus = json.load(f)
    meta["corpus"] = corpus["stats"]
    train_texts = [t for _, t in corpus["train"]]
    held_texts = [t for _, t in corpus["held_out"]]

    tok_dir = work / "tokenizer"
    if (out / "target" / "tokenizer.json").exists():  # a finished target fixes the tokenizer
        tok_dir = out / "target"
    if "tokenizer" in stages and not (tok_dir / "tokenizer.json").exists():
        _log("training the tokenizer")
        sample, n = [], 0
        for t in train_texts:
            if n > size.tokenizer.sample_bytes:
                break
            sample.append(t)
            n += len(t)
        train_tokenizer(sample, size.tokenizer.vocab_size, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    vocab = len(tokenizer)
    meta["vocab_size"] = vocab

    tokens_file = work / "tokens.npz"
    todo = [n for n in ("target", "draft") if n in stages and not (out / n / "config.json").exists()]
    if todo:
        if not tokens_file.exists():
            _log("tokenizing")
            np.savez(tokens_file, train=encode(tokenizer, train_texts), held_out=encode(tokenizer, held_texts))
        arrays = np.load(tokens_file)
        train_tokens = torch.from_numpy(arrays["train"].astype(np.int32))
        held_tokens = torch.from_numpy(arrays["held_out"].astype(np.int32))
        meta["train_tokens"], meta["held_out_tokens"] = len(train_tokens), len(held_tokens)
        _log(f"{len(train_tokens)} train / {len(held_tokens)} held-out tokens, vocabulary {vocab}")

    for name in todo:
        folder = out / name
        _log(f"training the {name}")
        spec = size[name]
        model, record = train_lm(spec, llama_config(spec, vocab, eos_id), train_tokens, held_tokens, device, cfg.seed)
        save_lm(model, tokenizer, folder, record, meta, f"{cfg.size.name}-{name}")
        _log(f"{name}: {record['parameters'] / 1e6:.2f}M parameters, held-out ppl {record['held_out_perplexity']}")
        del model

    need_target = any(s in stages for s in ("distill", "medusa", "eagle"))
    target = None
    if need_target:
        target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).to(device).eval()
    seq_file = work / "distill.safetensors"
    if "distill" in stages and not seq_file.exists():
        _log("distilling the target's continuations")
        seqs = distill_snippets(target, train_texts, tokenizer, size.distill, device, cfg.seed)
        save_sequences(seqs, seq_file)
    if "medusa" in stages and not (out / "medusa" / "config.json").exists():
        _log("training Medusa heads")
        seqs = load_sequences(seq_file)
        h = size.medusa
        torch.manual_seed(cfg.seed)
        heads = MedusaHeads(
            MedusaConfig(h.num_heads, h.num_layers, target.config.hidden_size, vocab, own_lm_head=False)
        )
        tc = TrainConfig(steps=h.steps, batch_size=h.batch_size, lr=h.lr, checkpoint_every=h.steps, log_every=50)
        train_medusa(target, heads, seqs, work / "medusa_run", tc)
        heads.save_pretrained(out / "medusa")
    if "eagle" in stages and not (out / "eagle" / "config.json").exists():
        _log("training the EAGLE drafter")
        seqs = load_sequences(seq_file)
        e = size.eagle
        torch.manual_seed(cfg.seed)
        drafter = eagle_drafter(target, 1, seqs)
        texts = held_out_prompts(held_texts, tokenizer, e.eval_prompts, 64)
        evals = [tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
        ec = EagleTrainConfig(
            steps=e.steps, batch_size=e.batch_size, lr=e.lr, checkpoint_every=e.checkpoint_every, log_every=50,
            eval_tokens=e.eval_tokens, eval_depth=e.eval_depth, eval_top_k=e.eval_top_k,
            eval_total_tokens=e.eval_total_tokens, seed=cfg.seed,
        )  # fmt: skip
        train_eagle(target, drafter, seqs, work / "eagle_run", ec, eval_prompts=evals)
        best = work / "eagle_run" / "best"
        from ..heads.eagle import load_eagle

        load_eagle(best).save_pretrained(out / "eagle")
        (out / "eagle" / "selection.json").write_text((best / "selection.json").read_text())
    if "eval" in stages:
        _log("evaluating")
        ev = size.eval
        sets = {
            "HumanEval": humaneval_prompts(Path(cfg.humaneval), ev.prompts),
            "held-out code": held_out_prompts(held_texts, tokenizer, ev.prompts, ev.prompt_tokens),
        }
        results = evaluate(out, tokenizer, sets, ev, device)
        (out / "eval.json").write_text(json.dumps({"results": results, **meta}, indent=1))
        write_card(out, cfg.size.name, results, ev, meta, size)
    return out


@hydra.main(version_base=None, config_path="pkg://specdec.conf", config_name="lm")
def main(cfg: DictConfig) -> None:
    _log(OmegaConf.to_yaml(cfg).replace("\n", " | "))
    run(cfg)


if __name__ == "__main__":
    main()
