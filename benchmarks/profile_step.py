"""Where the time of a decode step goes on the GPU (8B shape, bf16): a cProfile of the host and a
torch.profiler table of the device time per kernel, for plain decoding, a 1B-shaped draft model or
bench_engine's Replay proposer (tau exact, drafting free: what a speculative step costs beyond the
target's forward; pipelined, as the captured proposers run).

python benchmarks/profile_step.py [--tokens 64] [--context 1024] [--proposer none|draft|replay] [--tau 4] [--out DIR]

On the device image (specdec laid out by `make gpu-site`): `cd benchmarks && PYTHONPATH=/tmp/specdec-gpu-site
python3 profile_step.py ...`, without `-P`, which would drop this folder (and bench_engine) from the path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path

import torch
from bench_engine import DEV, EIGHT_B, ONE_B, TINY, TINY_DRAFT, Replay, build_model, sync

import specdec
from specdec import DraftModel, Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--proposer", choices=["none", "draft", "replay"], default="none")
    ap.add_argument("--tau", type=int, default=4, help="the replay proposer's tokens per step")
    ap.add_argument("--out", help="write host.txt and device.txt here (default: print)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU check of the script)")
    args = ap.parse_args()
    model = build_model(TINY if args.tiny else EIGHT_B)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context)).to(DEV)
    report = []
    proposer = None
    if args.proposer == "draft":
        draft = build_model(TINY_DRAFT if args.tiny else ONE_B)
        # the draft alone: its plain-decode TPOT is what one drafted token costs at best
        alone = Engine(draft, None)
        specdec.generate(draft, ids, max_new_tokens=8, engine=alone)
        o = specdec.generate(draft, ids, max_new_tokens=args.tokens, engine=alone, return_dict_in_generate=True)
        report.append(f"1B-shaped draft alone, plain decode TPOT {o.stats.tpot_ms:.2f} ms")
        one = Engine(draft, None)
        one.pipeline = False
        specdec.generate(draft, ids, max_new_tokens=8, engine=one)
        o = specdec.generate(draft, ids, max_new_tokens=args.tokens, engine=one, return_dict_in_generate=True)
        report.append(f"1B-shaped draft alone, one step at a time TPOT {o.stats.tpot_ms:.2f} ms")
        proposer = DraftModel(draft, num_tokens=4)
    if args.proposer == "replay":
        # anchored on the target's own output under tree steps (bench_engine's anchored): every step
        # then accepts exactly tau - 1 drafts
        key = tuple(ids[0].tolist())
        plain = specdec.generate(model, ids, max_new_tokens=args.tokens + 16)
        proposer = Replay({key: plain[0, ids.shape[1] :].tolist()}, args.tau, model.config.vocab_size, pipelined=True)
        eng = Engine(model, proposer)
        for _ in range(30):
            out = specdec.generate(model, ids, max_new_tokens=args.tokens + 16, engine=eng)
            new = {key: out[0, ids.shape[1] :].tolist()}
            if new == proposer.references:
                break
            proposer.references = new
    eng = Engine(model, proposer)
    specdec.generate(model, ids, max_new_tokens=16, engine=eng)
    prof = cProfile.Profile()
    prof.enable()
    out = specdec.generate(model, ids, max_new_tokens=args.tokens, engine=eng, return_dict_in_generate=True)
    sync()
    prof.disable()
    st = out.stats
    report.append(f"{args.proposer}: TPOT {st.tpot_ms:.2f} ms, tau {st.tau:.2f}, step {st.tpot_ms * st.tau:.2f} ms")
    host = io.StringIO()
    pstats.Stats(prof, stream=host).sort_stats("tottime").print_stats(30)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if DEV.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as p:
        out = specdec.generate(model, ids, max_new_tokens=args.tokens, engine=eng, return_dict_in_generate=True)
        sync()
    steps = max(out.stats.steps, 1)
    events = p.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    report.append(f"device time per step {device_us / steps / 1e3:.2f} ms over {steps} steps")
    table = events.table(sort_by="self_device_time_total", row_limit=30)
    # per kernel (device time > 0): calls and device us per step, to diff two proposers' steps
    kernels = sorted(
        (
            {"name": e.key, "calls_per_step": e.count / steps, "us_per_step": e.self_device_time_total / steps}
            for e in events
            if e.self_device_time_total > 0
        ),
        key=lambda k: -k["us_per_step"],
    )
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "host.txt").write_text(text + "\n\n" + host.getvalue())
        Path(args.out, "device.txt").write_text(text + "\n\n" + table)
        Path(args.out, "kernels.json").write_text(json.dumps({"report": report, "kernels": kernels}, indent=1))
    else:
        print(host.getvalue())
        print(table)


if __name__ == "__main__":
    main()
