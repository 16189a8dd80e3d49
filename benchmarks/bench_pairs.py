"""End to end on the trained demo pair: specdec's proposers against transformers' own paths, same
prompts, same run, same card.

Batch 1, greedy, HumanEval prompts (data/HumanEval.jsonl.gz), fp32 demo models (assets/demo).
transformers' paths run every prompt once after a warm-up prompt; specdec's run a first pass over
every prompt (graph captures, Triton compiles: reported as first_pass_tokens_per_s) and then the timed
pass. tokens/s = new tokens / wall time of the calls (device-synchronised), pooled over prompts;
tau = generated tokens / target forwards (prefill included). specdec rows reuse one Engine per method across prompts
of different lengths (the per-call TPOT spread shows whether anything is re-captured mid-run) and
are checked token for token against specdec's plain decoding.

    python benchmarks/bench_pairs.py --out pairs.json [--prompts 10] [--new-tokens 128]
    SPECDEC_DEMO_DIR=runs/bench python benchmarks/bench_pairs.py --out bench.json   # another pair (same layout)
    python benchmarks/bench_pairs.py --out t1.json --temperature 1 --only "specdec"   # sampled, specdec rows

At --temperature > 0 every path samples (top_k=0, seeded per call for specdec); outputs are then
not compared, and the EAGLE rows include top-k trees beside the default sampled trees.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import specdec
from specdec.demo import demo_dir

ROOT = Path(__file__).resolve().parents[1]


def only_parts(only: str) -> list[str]:
    """`--only`'s parts: split on the commas outside parentheses, so a row name such as
    "Eagle(4, 8, 31)" stays one part ("Eagle(4, 8, 31),plain" -> ["Eagle(4, 8, 31)", "plain"])."""
    parts = [w.strip() for w in re.split(r",(?![^()]*\))", only)]
    if not all(parts):
        raise SystemExit(f"--only {only!r} has an empty part; give comma-separated parts of row names")
    return parts


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _syncs_per_step(call) -> tuple[float, dict[str, int]]:
    """Implicit host-device synchronisations of one call (torch's sync debug mode warns at each),
    per target forward, and the sites they came from."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{w.filename.split('/')[-1]}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    steps = max(out.stats.target_forwards, 1) if hasattr(out, "stats") else 1
    return sum(sites.values()) / steps, sites


def _profile(path: str, name: str, call) -> None:
    """Append one call's host cProfile to `path`: the 25 functions with the most own time, then the
    25 with the most cumulative time (where a step's host time goes, per row)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    out = call()
    sync()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    steps = out.stats.target_forwards
    with open(path, "a") as f:
        f.write(f"\n===== {name}: {steps} target forwards, TPOT {out.stats.tpot_ms:.3f} ms =====\n{text.getvalue()}")


def _trace(folder: str, name: str, call) -> dict:
    """One call under torch.profiler: where a step's wall time goes. Returns kernels per step, the
    device's busy time per step (the union of kernel intervals: graph replays included, CUPTI
    records their kernels) and the wall time per step; the rest is exposed host time (the device
    idle, waiting for launches or for the host's bookkeeping). Writes the kernel table sorted by
    device time and the gzipped Chrome trace of the call into `folder`."""
    import tempfile

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = sync()
        out = call()
        wall = sync() - t0
    steps = max(out.stats.target_forwards, 1)
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    with gzip.open(Path(folder) / f"{slug}.trace.json.gz", "wt") as g:
        json.dump({"traceEvents": events}, g)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel" and "dur" in e)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # union of kernel intervals (us)
        if b > end:
            busy += b - max(a, end)
            end = b
    runtime = [e.get("name", "") for e in events if e.get("cat") == "cuda_runtime"]
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40)
    summary = {
        "kernels_per_step": len(spans) / steps,
        "device_busy_ms_per_step": busy / 1e3 / steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "graph_launches_per_step": sum("GraphLaunch" in n for n in runtime) / steps,
        "eager_launches_per_step": sum("LaunchKernel" in n for n in runtime) / steps,
        "memcpy_calls_per_step": sum("Memcpy" in n for n in runtime) / steps,
        "syncs_per_step": sum("Synchronize" in n for n in runtime) / steps,
        "target_forwards": steps,
        "tau": out.stats.generated_tokens / steps,
    }
    summary["exposed_host_ms_per_step"] = summary["wall_ms_per_step"] - summary["device_busy_ms_per_step"]
    head = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
    (Path(folder) / f"{slug}.kernels.txt").write_text(f"{name}\n{head}\n\n{table}\n")
    return summary


def _med(rows: list[dict], key: str) -> float:
    values = sorted(r[key] for r in rows)
    return values[len(values) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--profile",
        help="append a host cProfile (by own time and cumulative) of one call of every specdec row here "
        "(after every row is timed)",
    )
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs compared with plain)")
    ap.add_argument(
        "--only",
        help="comma-separated parts of row names: run only the rows that contain one (commas inside "
        "parentheses belong to a part: 'plain,Eagle(4, 8, 31)' is two parts)",
    )
    ap.add_argument(
        "--trace",
        help="a folder: one call of every specdec row under torch.profiler (kernels per step, "
        "device busy vs wall time per step, kernel table, Chrome trace), after every row is timed",
    )
    ap.add_argument("--no-ablations", action="store_true", help="skip the rows that run steps eagerly")
    ap.add_argument(
        "--no-rope-fusion", action="store_true", help="every row without the fused RoPE kernel (fusion.FUSE_ROPE)"
    )
    args = ap.parse_args()
    if args.no_rope_fusion:
        from specdec.runtime import fusion

        fusion.FUSE_ROPE = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    root = demo_dir()
    tok = AutoTokenizer.from_pretrained(root / "target")
    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=dtype).to(dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(root / "draft", dtype=dtype).to(dev).eval()
    with gzip.open(ROOT / "data" / "HumanEval.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["prompt"] for line in f][: args.prompts + 1]
    prompts = [tok(t, return_tensors="pt").input_ids.to(dev) for t in texts]
    warm, prompts = prompts[0], prompts[1:]
    N = args.new_tokens
    res = {
        "card": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dtype": args.dtype,
        "rope_fusion": not args.no_rope_fusion,
        "prompts": len(prompts),
        "prompt_tokens": [p.shape[1] for p in prompts],
        "new_tokens": N,
        "rows": [],
    }
    T = args.temperature
    res["temperature"] = T
    sampling = dict(do_sample=True, temperature=T, top_k=0) if T > 0 else dict(do_sample=False)
    hf_kw = dict(max_new_tokens=N, min_new_tokens=N, pad_token_id=tok.eos_token_id or 0, **sampling)
    wanted = only_parts(args.only) if args.only else None

    def selected(name: str) -> bool:
        return wanted is None or any(w in name for w in wanted)

    def hf(name, **extra):
        if not selected(name):
            return
        target.generate(warm, attention_mask=torch.ones_like(warm), **hf_kw, **extra)
        tokens, seconds = 0, 0.0
        for p in prompts:
            t0 = sync()
            out = target.generate(p, attention_mask=torch.ones_like(p), **hf_kw, **extra)
            seconds += sync() - t0
            tokens += out.shape[1] - p.shape[1]
        res["rows"].append({"method": name, "tokens_per_s": tokens / seconds})
        print(f"{name:42s} {tokens / seconds:8.1f} tok/s", flush=True)
        json.dump(res, open(args.out, "w"), indent=1)  # a run cut before specdec's rows keeps these

    hf("transformers generate")
    hf("transformers generate, assistant_model=draft", assistant_model=draft)
    hf("transformers generate, prompt_lookup_num_tokens=4", prompt_lookup_num_tokens=4)

    proposers = {
        "specdec plain": lambda: None,
        "specdec plain, one step at a time": lambda: None,
        "specdec DraftModel(4)": lambda: specdec.DraftModel(draft, num_tokens=4),
        "specdec DraftModel(3)": lambda: specdec.DraftModel(draft, num_tokens=3),
        "specdec Ngram(4)": lambda: specdec.Ngram(num_tokens=4),
        "specdec Medusa(32)": lambda: specdec.Medusa.from_pretrained(root / "medusa", tree=32),
        # 31 draft nodes + the root fill the 32-node bucket; 32 + the root are verified as 64
        "specdec Medusa(31)": lambda: specdec.Medusa.from_pretrained(root / "medusa", tree=31),
        "specdec Eagle(6, 10, 60)": lambda: specdec.Eagle.from_pretrained(root / "eagle"),
        "specdec Eagle(6, 10, 60), top-k trees": lambda: specdec.Eagle.from_pretrained(root / "eagle"),
        # the pipelined speculative loop's ablation: each step read back before the next is drafted
        "specdec Eagle(6, 10, 60), one step at a time": lambda: specdec.Eagle.from_pretrained(root / "eagle"),
        # the drafter's norms / MLP unfused and its cos / sin from the rotary module (before 2026-12-07)
        "specdec Eagle(6, 10, 60), unfused drafter": lambda: specdec.Eagle.from_pretrained(root / "eagle"),
        # smaller trees: on a pair whose target step is launch-bound (the demo pair), fewer drafter
        # levels cost less than the longer accepted paths of a deep tree bring
        "specdec Eagle(4, 8, 31)": lambda: specdec.Eagle.from_pretrained(
            root / "eagle", depth=4, top_k=8, total_tokens=31
        ),
        "specdec Eagle(3, 4, 15)": lambda: specdec.Eagle.from_pretrained(
            root / "eagle", depth=3, top_k=4, total_tokens=15
        ),
        "specdec Eagle chain(5)": lambda: specdec.Eagle.from_pretrained(root / "eagle", depth=5, chain=True),
        # a shorter chain: each drafted token is one sequential drafter step, and the demo pair
        # accepts ~1.6 of a chain's 5 drafts
        "specdec Eagle chain(3)": lambda: specdec.Eagle.from_pretrained(root / "eagle", depth=3, chain=True),
        "specdec EAGLE-3 Eagle(6, 10, 60)": lambda: specdec.Eagle.from_pretrained(root / "eagle3"),
        # ablations in the same run: the step tail (verify, K/V moves, read-back), EAGLE's tree
        # expansion and the draft model's chain eagerly, as before they were captured
        "specdec DraftModel(4), eager chain": lambda: specdec.DraftModel(draft, num_tokens=4),
        "specdec Ngram(4), eager step tail": lambda: specdec.Ngram(num_tokens=4),
        "specdec Eagle(6, 10, 60), eager tail and expansion": lambda: specdec.Eagle.from_pretrained(root / "eagle"),
    }
    if T == 0:  # greedy: top-k trees are the default run
        proposers.pop("specdec Eagle(6, 10, 60), top-k trees")
    plain_out = {}

    def build(name, make) -> dict:
        """The row's proposer and Engine, as `specdec.generate` keyword arguments."""
        proposer = make()
        if "top-k trees" in name:
            proposer.sampled_trees = False
        if "unfused drafter" in name:
            proposer.fuse, proposer.rope_table = False, False
        eager = "eager" in name
        if eager and isinstance(proposer, (specdec.Eagle, specdec.DraftModel)):
            proposer.graphs = False
        engine = specdec.Engine(target, proposer)
        engine.pipeline = "one step at a time" not in name
        engine.tail_graphs = not eager or "chain" in name  # the chain ablation keeps the tail's graph
        kw = dict(engine=engine, max_new_tokens=N, min_new_tokens=N, return_dict_in_generate=True, **sampling)
        if T > 0:
            kw["seed"] = 0
        return kw

    profiled = []  # (row, make): profiled and traced after every row is timed
    for name, make in proposers.items():
        if (not selected(name) or (args.no_ablations and "eager" in name)) and name != "specdec plain":
            continue  # plain decoding always runs: every row's reference
        heads = {"EAGLE-3": "eagle3", "Eagle": "eagle", "Medusa": "medusa"}
        folder = next((f for key, f in heads.items() if key in name), None)
        if folder and not (root / folder / "config.json").exists():  # a pair trained without these heads
            print(f"{name:42s} skipped: no {root / folder}", flush=True)
            continue
        kw = build(name, make)
        t0 = sync()
        cold_tokens = sum(specdec.generate(target, p, **kw).stats.generated_tokens for p in [warm, *prompts])
        cold = cold_tokens / (sync() - t0)  # first pass: captures, Triton compiles, pool allocation
        for p in prompts:  # a second untimed pass: prefills after a prefix-cache hit (short query tiles)
            specdec.generate(target, p, **kw)
        tokens, seconds, forwards, tpots, identical = 0, 0.0, 0, [], True
        calls = []  # where each call's time went: outside the engine, setup, prefill, steps
        for i, p in enumerate(prompts):
            t0 = sync()
            out = specdec.generate(target, p, **kw)
            wall = sync() - t0
            seconds += wall
            tokens += out.stats.generated_tokens
            forwards += out.stats.target_forwards
            tpots.append(out.stats.tpot_ms)
            st = out.stats
            calls.append(
                {
                    "wall_ms": 1e3 * wall,
                    "engine_ms": 1e3 * st.total_time_s,
                    "setup_ms": 1e3 * st.setup_time_s,
                    "prefill_ms": 1e3 * st.prefill_time_s,
                    "ttft_ms": st.ttft_ms,
                    "graph_captures": st.graph_captures,
                }
            )
            if name == "specdec plain":
                plain_out[i] = out.sequences
            elif T == 0:
                identical &= torch.equal(out.sequences, plain_out[i])
        tau = tokens / forwards
        steady = sorted(tpots)[len(tpots) // 2]
        syncs = None
        if dev.type == "cuda":
            syncs = _syncs_per_step(lambda kw=kw: specdec.generate(target, prompts[0], **kw))
        row = {
            "method": name,
            "tokens_per_s": tokens / seconds,
            "first_pass_tokens_per_s": cold,
            "tau": tau,
            "greedy_identical": identical if T == 0 else None,
            "tpot_ms_per_call": tpots,
            "worst_call_vs_median_tpot": max(tpots) / steady,
            "calls": calls,
            "host_syncs_per_step": syncs,
            "trace": None,
        }
        res["rows"].append(row)
        if args.profile or args.trace:
            profiled.append((row, make))
        print(
            f"{name:42s} {row['tokens_per_s']:8.1f} tok/s (first pass {cold:6.1f})  tau {tau:.2f}  "
            f"identical {identical if T == 0 else '-'}  "
            f"worst call / median TPOT {row['worst_call_vs_median_tpot']:.2f}  "
            f"median TPOT {steady:.2f} ms  per call: wall {_med(calls, 'wall_ms'):.1f} ms, engine "
            f"{_med(calls, 'engine_ms'):.1f}, setup {_med(calls, 'setup_ms'):.1f}, "
            f"prefill {_med(calls, 'prefill_ms'):.1f}, "
            f"captures {sum(c['graph_captures'] for c in calls)}, "
            f"host syncs / step {syncs[0] if syncs else float('nan'):.1f}",
            flush=True,
        )
        json.dump(res, open(args.out, "w"), indent=1)  # after every row: a cut run keeps what it measured
    # Profiles and traces run after every row is timed, each on a fresh Engine (warmed by one call):
    # rows timed after a torch.profiler session disagreed with an unprofiled run by -20 % to +10 %
    # (2026-12-07 (g), call 3).
    for row, make in profiled:
        name = row["method"]
        kw = build(name, make)
        specdec.generate(target, prompts[0], **kw)  # captures and compiles: not profiled
        if args.profile:
            _profile(args.profile, name, lambda kw=kw: specdec.generate(target, prompts[0], **kw))
        if args.trace and dev.type == "cuda":
            row["trace"] = _trace(args.trace, name, lambda kw=kw: specdec.generate(target, prompts[0], **kw))
            print(f"{name:42s} trace: {row['trace']}", flush=True)
        del kw
        json.dump(res, open(args.out, "w"), indent=1)
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
