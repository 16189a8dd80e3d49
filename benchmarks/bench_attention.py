"""Tile sweep of the paged tree-attention kernel at the 8B attention shape (one layer, bf16).

    python benchmarks/bench_attention.py --out attention.json          # on the GPU (~2 minutes)
    python benchmarks/bench_attention.py --tiny --out /tmp/a.json      # a CPU check (TRITON_INTERPRET=1)

For T new tokens (decode 1, trees of 16 / 32 / 64 nodes) over a committed prefix (1024 / 4096), at
H = 32 query heads, 8 KV heads, head size 128, batch 1: the device time of one
`paged_tree_attention` call (split + merge) for the default `tile_config` and for every tile shape
in the sweep, each checked against the torch reference first (a shape that computes a wrong answer
is recorded as such, never timed). Times come from CUDA graphs of 50 calls, so Python's launch cost
is not in them. Prints, per (T, prefix), the default's microseconds, the best shape's and the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import time

import torch
import triton

from specdec.kernels.paged_attention import (
    Tiles,
    _next_pow2,
    paged_tree_attention,
    paged_tree_attention_reference,
    tile_config,
)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def problem(T: int, prefix: int, H: int, Hkv: int, D: int, page: int, dtype) -> dict:
    """One row's prefix in shuffled pages, T new tokens in a binary tree (T = 1: decode)."""
    g = torch.Generator(device="cpu").manual_seed(T * 7919 + prefix)
    pages = triton.cdiv(prefix + T, page) + 1
    S = pages * page
    k = torch.randn(S, Hkv, D, generator=g).to(DEV, dtype)
    v = torch.randn(S, Hkv, D, generator=g).to(DEV, dtype)
    table = torch.randperm(pages, generator=g)[None].to(DEV, torch.int32)
    pos = prefix + torch.arange(T)
    new_slots = (table[0, (pos // page).to(DEV)].long() * page + (pos % page).to(DEV))[None]
    parents = [-1] + [(i - 1) // 2 for i in range(1, T)]
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    depth = mask.sum(1) - 1
    return dict(
        q=torch.randn(1, T, H, D, generator=g).to(DEV, dtype),
        k_cache=k,
        v_cache=v,
        block_tables=table,
        prefix_lens=torch.tensor([prefix], device=DEV, dtype=torch.int32),
        new_slots=new_slots,
        tree_mask=mask[None].to(DEV),
        scale=D**-0.5,
        page_size=page,
        q_positions=(prefix + depth)[None].to(DEV),
    )


def device_us(fn, calls: int = 50, reps: int = 5) -> float:
    """Median microseconds a call of fn, from CUDA graphs of `calls` calls (eager on the CPU)."""
    if DEV.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="a small sweep (a CPU check of the script)")
    ap.add_argument("--nodes", default="1,16,32,64", help="new tokens a step (comma-separated)")
    ap.add_argument("--prefixes", default="1024,4096", help="committed keys (comma-separated)")
    ap.add_argument("--block-m", default="16,32,64,128", help="query-row tiles to sweep")
    ap.add_argument("--block-n", default="32,64,128", help="prefix-key tiles to sweep")
    args = ap.parse_args()
    H, Hkv, D, page = 32, 8, 128, 16
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    if args.tiny:
        H, Hkv, D = 4, 2, 16
        cases = [(1, 40), (16, 40)]
        sweep = [(16, 16, 4, 3), (32, 32, 4, 2)]  # (block_m, block_n, num_warps, num_stages)
        splits = [None, 2]
    else:
        ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
        cases = [(T, P) for P in ints(args.prefixes) for T in ints(args.nodes)]
        sweep = [
            (m, n, w, st)
            for m, n, w, st in itertools.product(ints(args.block_m), ints(args.block_n), (4, 8), (2, 3))
            if not (m == 128 and n == 128)  # over the shared memory of one SM at D = 128
        ]
        splits = [None, 8, 16, 32, 64]
    res = {
        "card": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": dict(H=H, Hkv=Hkv, D=D, page=page, dtype=str(dtype), batch=1),
        "cases": [],
    }
    G = H // Hkv
    for T, P in cases:
        prob = problem(T, P, H, Hkv, D, page, dtype)
        ref = paged_tree_attention_reference(**prob).float()
        default = tile_config(T, G, max(16, _next_pow2(D)))
        shapes = [default] + [
            Tiles(m, n, default.block_t, num_warps=w, num_stages=st) for m, n, w, st in sweep
        ]  # the sweep keeps the default's new-key step
        rows = []
        for base, ns in itertools.product(shapes, splits):
            tiles = dataclasses.replace(base, num_splits=ns)
            if T * G <= 16 and tiles.block_m > 32 and base is not default:
                continue  # decode: one query tile of 4 rows; wider tiles only add padding
            row = {"tiles": dataclasses.asdict(tiles), "default": base is default}

            def call(tiles=tiles, prob=prob, P=P):
                return paged_tree_attention(**prob, max_prefix=P, tiles=tiles)

            try:
                err = (call().float() - ref).abs().max().item()
                row["max_abs_err"] = err
                if err > (2e-2 if dtype == torch.bfloat16 else 1e-4):
                    row["wrong"] = True
                else:
                    row["us"] = device_us(call)
            except Exception as e:  # out of resources and the like: record, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
        timed = [r for r in rows if "us" in r]
        d = min((r["us"] for r in timed if r["default"] and r["tiles"]["num_splits"] is None), default=None)
        best = min(timed, key=lambda r: r["us"]) if timed else None
        res["cases"].append({"T": T, "prefix": P, "default_us": d, "best": best, "rows": rows})
        if best is not None:
            print(
                f"T={T:3d} prefix={P:5d} default {d:8.2f} us  best {best['us']:8.2f} us "
                f"({d / best['us']:.2f}x) {best['tiles']}",
                flush=True,
            )
        json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
