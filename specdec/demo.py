"""`make demo`: speculative decoding with the trained demo models, offline, on the CPU.

Runs `specdec profile` on the demo pair (assets/demo: a 9.5M-parameter Llama target trained on
Python source, a 1.4M draft, Medusa heads and an EAGLE drafter trained on the target's own
continuations) with HumanEval prompts, for the draft model, n-gram lookup, Medusa and EAGLE, and
prints one table: tau, acceptance rate, tokens/s with and without speculation (same engine, same
run), and whether the greedy outputs were identical to plain decoding.

    python -m specdec.demo [--prompts 8] [--max-new-tokens 64] [--temperature 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

# CPU-sized settings: on 2 cores the 9.5M target's forward costs ~10 ms, so wide trees do not pay;
# the model card (assets/demo/README.md) has the GPU numbers with EAGLE-2's published tree.
PROPOSERS = {
    "draft": (["--num-tokens", "4"], "DraftModel(4)"),
    "ngram": (["--num-tokens", "4"], "Ngram(4)"),
    "medusa": (["--tree", "8"], "Medusa(tree=8)"),
    "eagle": (["--depth", "5", "--top-k", "4", "--total-tokens", "12"], "Eagle(depth=5, top_k=4, 12 nodes)"),
}


def demo_dir() -> Path:
    """The demo models: $SPECDEC_DEMO_DIR, else the copy installed with specdec (specdec.assets,
    which is assets/ of a source checkout)."""
    path = Path(os.environ.get("SPECDEC_DEMO_DIR") or _package_file("specdec.assets", "demo"))
    if not (path / "target" / "config.json").is_file():
        raise FileNotFoundError(
            f"no demo models at {path} (specdec installs them as package data; or set SPECDEC_DEMO_DIR)"
        )
    return path


def humaneval_path() -> Path:
    """HumanEval's 164 prompts (MIT, HumanEval.LICENSE beside them), installed with specdec."""
    return _package_file("specdec.data", "HumanEval.jsonl.gz")


def _package_file(package: str, name: str) -> Path:
    from importlib.resources import files

    return Path(str(files(package) / name))


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from .cli import cmd_profile, parser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="HumanEval prompts (the first n)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    root = demo_dir()
    prompts = humaneval_path()
    torch.manual_seed(0)
    console = Console(width=120)
    console.print(
        f"specdec demo: trained demo models ({root}), {args.prompts} HumanEval prompts, "
        f"{args.max_new_tokens} new tokens, temperature {args.temperature:g}, CPU fp32, "
        f"{torch.get_num_threads()} threads"
    )
    table = Table(title="speculative vs plain decoding, same engine, same run")
    for col in ("proposer", "tau", "acceptance", "tok/s spec", "tok/s plain", "speedup", "greedy identical"):
        table.add_column(col, justify="left" if col == "proposer" else "right")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (extra, label) in PROPOSERS.items():
            # no --target: the command takes the demo target and its draft / Medusa / EAGLE checkpoints
            argv = ["profile", "--proposer", name, *extra]
            argv += ["--prompts", str(prompts), "--limit", str(args.prompts), "--device", "cpu", "--quiet"]
            argv += ["--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
            ns = parser().parse_args([*argv, "--out", str(Path(tmp) / name)])
            ns.table = False
            console.print(f"  profiling {label} ...")
            r = cmd_profile(ns)
            same = "-" if r["greedy_identical"] is None else str(r["greedy_identical"])
            table.add_row(
                label,
                f"{r['tau']:.2f}",
                f"{r['acceptance_rate']:.2f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['plain_tokens_per_s']:.0f}",
                f"{r['speedup']:.2f}",
                same,
            )
            if r["greedy_identical"] is False:
                raise SystemExit(f"{name}: greedy speculative output differs from plain decoding")
    console.print(table)
    console.print(
        "tau = tokens per target forward (bonus included); acceptance = accepted / drafted tokens (a tree drafts "
        "every node, so tree proposers show low acceptance at high tau). On 2 CPU cores the 9.5M target's "
        "forward is so cheap that drafting overhead eats most of the gain; GPU numbers: assets/demo/README.md "
        f"and docs/benchmarks.md. ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
