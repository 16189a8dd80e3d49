"""Is a speculative step on the demo pair bound by its graphs or by the host? Replays every CUDA
graph a proposer captured, back to back, and compares with the step's wall time.

For each row (plain, DraftModel(4), EAGLE trees and chains on the trained demo pair, bf16, batch 1),
two HumanEval prompts run through one Engine (captures, steady state), then one timed call gives
the step time (TPOT x tau = wall ms per target forward). Then every captured graph (the target's
forward / tree graphs, the engine's step tails, the proposer's drafting graphs) is replayed 50 times
back to back on its last inputs:
  device ms / replay = wall of the 50 replays / 50: the graph's device time including the gaps
                       between its kernels (which a profiler's kernel-busy time leaves out);
  launch ms / replay = host time to issue one replay (cudaGraphLaunch) while the device is busy.
If the step's graphs (the hottest key of each kind) add up to about the step time, the step is
device bound and fewer kernels is the lever; if they add up to much less, the host is.

    SPECDEC_DEMO_DIR=$PWD/assets/demo python3 -P benchmarks/graph_replay.py --out replay.json

Replaying moves K/V the graphs already moved (the pools are not used again): run it last.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specdec
from specdec.demo import demo_dir

ROOT = Path(__file__).resolve().parents[1]


def _graphs(engine: specdec.Engine, proposer) -> list[tuple[str, tuple, torch.cuda.CUDAGraph]]:
    """Every captured graph of the engine and its proposer: (kind, key, graph)."""
    out = []
    g = engine.runner.graphs
    if g is not None:
        out += [("target forward", k, c.graph) for k, c in g.graphs.items()]
        out += [("target tree", k, c.graph) for k, c in g.tree_graphs.items()]
    out += [("step tail", k, v[0]) for k, v in engine._tails.calls.items()]
    calls = getattr(proposer, "_graphs", None)
    if calls is not None and hasattr(calls, "calls"):
        out += [("drafting", k, v[0]) for k, v in calls.calls.items()]
    runner = getattr(proposer, "runner", None)  # the draft model's own forwards
    if runner is not None and runner.graphs is not None:
        out += [("draft forward", k, c.graph) for k, c in runner.graphs.graphs.items()]
        out += [("draft tree", k, c.graph) for k, c in runner.graphs.tree_graphs.items()]
    return out


def _time(graph: torch.cuda.CUDAGraph, n: int = 50) -> tuple[float, float]:
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    launched = time.perf_counter()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    return 1e3 * (t1 - t0) / n, 1e3 * (launched - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_replay.py times CUDA graphs: run it on a CUDA device")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    root = demo_dir()
    tok = AutoTokenizer.from_pretrained(root / "target")
    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=dtype).to(dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(root / "draft", dtype=dtype).to(dev).eval()
    with gzip.open(ROOT / "data" / "HumanEval.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["prompt"] for line in f][:3]
    prompts = [tok(t, return_tensors="pt").input_ids.to(dev) for t in texts]
    rows = {
        "plain": lambda: None,
        "DraftModel(4)": lambda: specdec.DraftModel(draft, num_tokens=4),
        "Eagle(3, 4, 15)": lambda: specdec.Eagle.from_pretrained(root / "eagle", depth=3, top_k=4, total_tokens=15),
        "Eagle(6, 10, 60)": lambda: specdec.Eagle.from_pretrained(root / "eagle"),
        "Eagle chain(3)": lambda: specdec.Eagle.from_pretrained(root / "eagle", depth=3, chain=True),
        "Eagle chain(5)": lambda: specdec.Eagle.from_pretrained(root / "eagle", depth=5, chain=True),
    }
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    N = args.new_tokens
    for name, make in rows.items():
        proposer = make()
        engine = specdec.Engine(target, proposer)
        kw = dict(engine=engine, max_new_tokens=N, min_new_tokens=N, return_dict_in_generate=True)
        for p in prompts[:2]:
            specdec.generate(target, p, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = specdec.generate(target, prompts[2], **kw)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        st = out.stats
        # TPOT leaves the prefill out: the decode steps' tokens per step
        step_ms = st.tpot_ms * (st.generated_tokens - 1) / max(st.target_forwards - 1, 1)
        graphs = []
        for kind, key, graph in _graphs(engine, proposer):
            try:
                dev_ms, launch_ms = _time(graph)
            except Exception as e:  # a graph that cannot replay alone: recorded, the rest go on
                graphs.append({"kind": kind, "key": str(key), "error": repr(e)})
                continue
            graphs.append({"kind": kind, "key": str(key), "device_ms": dev_ms, "launch_ms": launch_ms})
        row = {
            "method": name,
            "tau": st.generated_tokens / st.target_forwards,
            "tpot_ms": st.tpot_ms,
            "step_ms": step_ms,
            "call_ms": 1e3 * wall,
            "graphs": graphs,
        }
        res["rows"].append(row)
        print(f"{name}: tau {row['tau']:.2f}, TPOT {st.tpot_ms:.3f} ms, step {step_ms:.3f} ms", flush=True)
        for g in graphs:
            timing = g.get("error") or f"device {g['device_ms']:.3f} ms  launch {g['launch_ms']:.3f} ms"
            print(f"    {g['kind']:15s} {g['key'][:70]:70s} {timing}")
        json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
