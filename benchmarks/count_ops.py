"""Ops per captured EAGLE drafting step, counted on the CPU: a GPU-free proxy for its kernel count.

On the demo pair a speculative step is device bound by many small kernels (docs/benchmarks.md,
2026-12-07 (g): ~66 kernels and ~0.25 ms per drafting level on an H100), so the number of ops a
drafting graph records predicts its cost. This script runs the function a CUDA graph would capture
(`GraphedCalls(capture=False)`: the same padded static buffers, run eagerly) for the trained demo
pair on the CPU in fp32 and counts the aten ops of the last step, as a graph would record them:

- views, and `to` calls that change nothing, are not counted (no kernel);
- each Triton kernel (paged attention, K/V store, RoPE, RMSNorm, SiLU-mul) counts once, as on a
  GPU, and runs its torch reference; the drafter is fused as on a GPU (norms, MLP, RoPE, and its
  q / k / v as one GEMM where the drafter has `fuse_qkv`);
- on a GPU, paged attention adds a merge kernel per call and bf16 logits one `.float()` per
  drafter read-out; cuBLAS may split a GEMM. Compare counts of this script with each other.

    python benchmarks/count_ops.py                      # every row, ~1 min on 2 cores
    python benchmarks/count_ops.py --rows "chain(5)" --ops   # the op sequence, one drafter call a line
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused RoPE path is taken off a GPU only under it

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROWS = {
    "chain(3)": ("eagle", dict(depth=3, chain=True)),
    "chain(5)": ("eagle", dict(depth=5, chain=True)),
    "(3, 4, 15)": ("eagle", dict(depth=3, top_k=4, total_tokens=15)),
    "(4, 8, 31)": ("eagle", dict(depth=4, top_k=8, total_tokens=31)),
    "(6, 10, 60)": ("eagle", dict()),
    "EAGLE-3 (6, 10, 60)": ("eagle3", dict()),
}
NO_KERNEL = {
    "view", "_unsafe_view", "expand", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "permute",
    "alias", "reshape", "as_strided", "detach", "_reshape_alias", "split", "split_with_sizes", "unbind",
    "lift_fresh", "unflatten", "flatten", "to", "new_empty", "empty_like", "empty",
}  # fmt: skip


class _Count(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active (see NO_KERNEL), in order."""

    def __init__(self):
        super().__init__()
        self.seq: list[str] = []
        self.inside_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not self.inside_kernel:
            self.seq.append(name)
        return func(*args, **(kwargs or {}))


_ACTIVE: list[_Count] = []


def _as_one_op(name: str, fn):
    """A Triton kernel's stand-in: one counted op, its torch reference uncounted inside."""

    def run(*args, **kwargs):
        c = _ACTIVE[-1] if _ACTIVE else None
        if c is None:
            return fn(*args, **kwargs)
        c.seq.append(f"kernel:{name}")
        c.inside_kernel += 1
        try:
            return fn(*args, **kwargs)
        finally:
            c.inside_kernel -= 1

    return run


@contextlib.contextmanager
def counted_kernels():
    """The Triton kernels as counted torch references while open (restored after)."""
    import specdec.kernels as K

    def attention(q, k_cache, v_cache, tables, prefix_lens, new_slots, mask, scale, page, max_prefix=0, **kw):
        kw = {n: kw[n] for n in ("q_positions", "sliding_window", "softcap", "sinks", "new_k", "new_v") if n in kw}
        ref = K.paged_tree_attention_reference
        return ref(q, k_cache, v_cache, tables, prefix_lens, new_slots, mask, scale, page, **kw)

    swaps = {
        "paged_tree_attention": _as_one_op("attention", attention),
        "store_kv": _as_one_op("store_kv", K.store_kv_reference),
        "rope": _as_one_op("rope", K.rope_reference),
        "rms_norm": _as_one_op("rms_norm", K.rms_norm_reference),
        "silu_mul": _as_one_op("silu_mul", K.silu_mul_reference),
    }
    saved = {n: getattr(K, n) for n in swaps}
    try:
        for n, f in swaps.items():
            setattr(K, n, f)
        yield
    finally:
        for n, f in saved.items():
            setattr(K, n, f)


def count_row(target, root, folder: str, shape: dict, new_tokens: int, prompt: torch.Tensor) -> dict:
    """Ops of the last captured drafting step of one generate call."""
    import specdec
    from specdec.runtime.fusion import fusable
    from specdec.runtime.graphs import GraphedCalls

    steps: list[list[str]] = []

    class Counted(specdec.Eagle):
        def start(self, *a, **k):
            super().start(*a, **k)
            self._fused = fusable(self.drafter)  # as on a GPU
            if hasattr(self.drafter, "fuse_qkv"):
                self._qkv = self.drafter.fuse_qkv(True)

        def _catch_up_and_expand(self, *a, **k):
            fn = super()._catch_up_and_expand(*a, **k)

            def run(t):
                c = _Count()
                _ACTIVE.append(c)
                try:
                    with c:
                        return fn(t)
                finally:
                    _ACTIVE.pop()
                    steps.append(c.seq)

            return run

    p = Counted.from_pretrained(root / folder, **shape)
    p.graphs = GraphedCalls(capture=False)
    specdec.generate(target, prompt, proposer=p, max_new_tokens=new_tokens)
    if not steps:
        raise RuntimeError(f"{folder} {shape}: no captured drafting step ran (too few new tokens?)")
    last = steps[-1]
    return {"steps": len(steps), "ops": len(last), "by_op": collections.Counter(last).most_common(), "seq": last}


def row_names(arg: str) -> list[str]:
    """`--rows` split at the commas outside parentheses, each part a name of ROWS."""
    parts, depth, cur = [], 0, ""
    for ch in arg:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    unknown = [p for p in parts if p not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; the rows are {list(ROWS)}")
    return parts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated names of {list(ROWS)}")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--ops", action="store_true", help="print each row's op sequence, one drafter call a line")
    ap.add_argument("--out", help="write the counts as JSON here")
    args = ap.parse_args(argv)
    wanted = row_names(args.rows)
    if args.new_tokens < 4:
        raise SystemExit(f"--new-tokens {args.new_tokens}: need >= 4 for a captured step after the prompt's")
    from transformers import AutoModelForCausalLM

    from specdec.demo import demo_dir

    with counted_kernels():
        torch.manual_seed(0)
        root = demo_dir()
        target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32).eval()
        prompt = torch.randint(3, int(target.config.vocab_size), (1, 40), generator=torch.Generator().manual_seed(0))
        res = {"torch": torch.__version__, "new_tokens": args.new_tokens, "rows": {}}
        for name in wanted:
            folder, shape = ROWS[name]
            row = count_row(target, root, folder, shape, args.new_tokens, prompt)
            res["rows"][name] = {k: v for k, v in row.items() if k != "seq" or args.ops}
            print(f"{name:22s} {row['ops']:4d} ops in a drafting step  (top: {row['by_op'][:6]})", flush=True)
            if args.ops:
                line: list[str] = []
                for op in row["seq"]:
                    line.append(op)
                    if op == "kernel:silu_mul":  # a drafter call ends with its MLP
                        print("    " + " ".join(line))
                        line = []
                print("    " + " ".join(line))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
