"""`make demo`: speculative decoding with the trained demo models, offline (CPU by default).

Runs `specdec.profile.profile` (what `specdec profile` runs) on the demo pair (assets/demo: a
9.5M-parameter Llama target trained on Python source, a 1.4M draft, Medusa heads and an EAGLE
drafter trained on the target's own continuations) with HumanEval prompts, for the draft model,
n-gram lookup, Medusa, EAGLE-1/2 and EAGLE-3, and prints one table: tau, acceptance rate, tokens/s with and
without speculation (same engine, same run), and whether the greedy outputs were identical to
plain decoding.

    python -m specdec.demo [--prompts 8] [--max-new-tokens 64] [--temperature 0] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

import specdec

from .resources import demo_dir, humaneval_path

# CPU-sized settings: on 2 cores the 9.5M target's forward costs ~10 ms, so wide trees do not pay;
# the model card (assets/demo/README.md) has the GPU numbers with EAGLE-2's published tree.
PROPOSERS = {
    "DraftModel(4)": lambda root, target, draft: specdec.DraftModel(draft, num_tokens=4),
    "Ngram(4)": lambda root, target, draft: specdec.Ngram(num_tokens=4),
    "Medusa(tree=8)": lambda root, target, draft: specdec.Medusa.from_pretrained(root / "medusa", tree=8),
    "EAGLE-1/2 (depth=5, top_k=4, 12 nodes)": lambda root, target, draft: specdec.Eagle.from_pretrained(
        root / "eagle", depth=5, top_k=4, total_tokens=12
    ),
    "EAGLE-3 (depth=5, top_k=4, 12 nodes)": lambda root, target, draft: specdec.Eagle.from_pretrained(
        root / "eagle3", depth=5, top_k=4, total_tokens=12
    ),
}


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .profile import ProfileSettings, profile
    from .prompts import load_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="HumanEval prompts (the first n)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    args = ap.parse_args(argv)
    root = demo_dir()
    from .devices import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"specdec demo: --device {args.device}: {e}") from None
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(root / "target")
    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(root / "draft", dtype=torch.float32).to(device).eval()
    prompts = load_prompts(humaneval_path(), limit=args.prompts)
    settings = ProfileSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    console = Console(width=120)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    console.print(
        f"specdec demo: trained demo models ({root}), {args.prompts} HumanEval prompts, "
        f"{args.max_new_tokens} new tokens, temperature {args.temperature:g}, fp32 on {where}"
    )
    table = Table(title="speculative vs plain decoding, same engine, same run")
    for col in ("proposer", "tau", "acceptance", "tok/s spec", "tok/s plain", "speedup", "greedy identical"):
        table.add_column(col, justify="left" if col == "proposer" else "right")
    t0 = time.perf_counter()
    for label, make in PROPOSERS.items():
        console.print(f"  profiling {label} ...")
        r = profile(target, tok, make(root, target, draft), prompts, settings).as_dict()
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
            raise SystemExit(f"{label}: greedy speculative output differs from plain decoding")
    console.print(table)
    console.print(
        "tau = tokens per target forward (bonus included); acceptance = accepted / drafted tokens (a tree drafts "
        "every node, so tree proposers show low acceptance at high tau). On 2 CPU cores the 9.5M target's "
        "forward is so cheap that drafting overhead eats most of the gain; GPU numbers: assets/demo/README.md "
        f"and docs/benchmarks.md. ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
