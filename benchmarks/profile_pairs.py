"""cProfile of one speculative call per proposer on the trained demo pair (after a warm-up call):
where a host-bound step spends its time. One file per proposer (cumulative and own time, top 45).

    python benchmarks/profile_pairs.py OUT_DIR [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import json
import pstats
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specdec
from specdec.resources import demo_dir, humaneval_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", help="the demo models' dtype (float32 or bfloat16)")
    ap.add_argument("--only", default="draft,ngram,medusa,eagle", help="comma-separated proposers")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = demo_dir()
    tok = AutoTokenizer.from_pretrained(root / "target")
    dtype = getattr(torch, args.dtype)
    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=dtype).to(dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(root / "draft", dtype=dtype).to(dev).eval()
    with gzip.open(humaneval_path(), "rt") as f:
        text = json.loads(next(iter(f)))["prompt"]
    ids = tok(text, return_tensors="pt").input_ids.to(dev)
    makers = {
        "draft": lambda: specdec.DraftModel(draft, num_tokens=4),
        "ngram": lambda: specdec.Ngram(num_tokens=4),
        "medusa": lambda: specdec.Medusa.from_pretrained(root / "medusa", tree=32),
        "eagle": lambda: specdec.Eagle.from_pretrained(root / "eagle"),
    }
    for name, make in makers.items():
        if name not in args.only.split(","):
            continue
        engine = specdec.Engine(target, make())
        kw = dict(engine=engine, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  return_dict_in_generate=True)  # fmt: skip
        for _ in range(2):
            specdec.generate(target, ids, **kw)
        prof = cProfile.Profile()
        prof.enable()
        res = specdec.generate(target, ids, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        prof.disable()
        with open(out / f"profile_{name}.txt", "w") as f:
            f.write(f"{name}: {res.stats.target_forwards} target forwards, tau {res.stats.tau:.2f}\n")
            stats = pstats.Stats(prof, stream=f)
            stats.sort_stats("cumulative").print_stats(45)
            stats.sort_stats("tottime").print_stats(30)
        print(name, f"tau {res.stats.tau:.2f}", f"{res.stats.total_time_s * 1e3:.0f} ms", flush=True)
        if dev.type == "cuda":  # device time: is a step waiting for the GPU or the GPU for the host?
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
                t0 = torch.cuda.Event(enable_timing=True)
                t1 = torch.cuda.Event(enable_timing=True)
                t0.record()
                res = specdec.generate(target, ids, **kw)
                t1.record()
                torch.cuda.synchronize()
            table = trace.key_averages().table(sort_by="self_device_time_total", row_limit=30)
            from torch.autograd import DeviceType

            kernel_us = sum(e.self_device_time_total for e in trace.events() if e.device_type == DeviceType.CUDA)
            wall_ms = t0.elapsed_time(t1)
            steps = max(res.stats.target_forwards, 1)
            line = (
                f"{name}: wall {wall_ms:.1f} ms (under the profiler), device busy {kernel_us / 1e3:.1f} ms, "
                f"{steps} target forwards: {wall_ms / steps:.3f} ms a step, device {kernel_us / 1e3 / steps:.3f} ms"
            )
            print(line, flush=True)
            (out / f"device_{name}.txt").write_text(line + "\n\n" + table)


if __name__ == "__main__":
    main()
