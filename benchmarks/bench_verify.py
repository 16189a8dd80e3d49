"""Time of the torch reference verifier at vocabulary 128256 (does a fused sampling kernel pay?).

    python benchmarks/bench_verify.py

Prints the median time of `verify` for chains and trees of 8 / 16 / 64 nodes, greedy and exact
(POINT and IID laws; fused Triton walk on a GPU, and the torch walk for comparison), at batch 1 and
16, to set against a step forward (7 ms for the 8B shape on an H200).
"""

from __future__ import annotations

import torch
from bench_engine import DEV, timed

from specdec import DraftTree, Law, RowSeeds, SamplingParams, verify

V = 128256 if DEV.type == "cuda" else 1000


def main() -> None:
    print(f"{'batch':>5} {'nodes':>5} {'mode':<18} {'ms':>8}")
    for B in (1, 16):
        for N in (8, 16, 64):
            logits = torch.randn(B, N, V, device=DEV, dtype=torch.bfloat16)
            q = torch.softmax(torch.randn(B, N - 1, V, device=DEV), -1)
            drafts = q.argmax(-1)
            roots = torch.zeros(B, dtype=torch.long, device=DEV)
            parents = [[-1] + [(i - 1) // 2 for i in range(1, N)]] * B
            cases = {
                "greedy": (
                    DraftTree.chain(roots, drafts),
                    SamplingParams.make(B, temperature=0.0, device=DEV),
                    "greedy",
                ),
                "exact-chain": (
                    DraftTree.chain(roots, drafts, Law.IID, q),
                    SamplingParams.make(B, temperature=1.0, device=DEV),
                    "exact",
                ),
                "exact-tree": (
                    DraftTree.from_parents([[0] + list(range(1, N))] * B, parents, device=DEV),
                    SamplingParams.make(B, temperature=1.0, device=DEV),
                    "exact",
                ),
            }
            rng = RowSeeds(torch.arange(B, device=DEV), torch.zeros(B, dtype=torch.long, device=DEV))
            cases["exact-chain-torch"] = (*cases["exact-chain"][:2], "torch")
            for name, (tree, params, mode) in cases.items():
                t = timed(
                    lambda tree=tree, params=params, mode=mode, x=logits, g=rng: verify(
                        tree,
                        x,
                        params,
                        mode="exact" if mode == "torch" else mode,
                        rng=g,
                        fused=False if mode == "torch" else None,
                    ),
                    reps=10,
                    warmup=2,
                )
                print(f"{B:>5} {N:>5} {name:<18} {t * 1e3:8.2f}", flush=True)


if __name__ == "__main__":
    main()
