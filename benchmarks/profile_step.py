"""Where the host time of a decode step goes: cProfile of plain decoding on the GPU (8B shape, bf16).

python benchmarks/profile_step.py [--tokens 64] [--context 1024]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from bench_engine import EIGHT_B, build_model

import specdec
from specdec import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    model = build_model(EIGHT_B)
    ids = torch.randint(0, EIGHT_B["vocab_size"], (1, args.context)).cuda()
    eng = Engine(model, None)
    specdec.generate(model, ids, max_new_tokens=8, engine=eng)
    prof = cProfile.Profile()
    prof.enable()
    out = specdec.generate(model, ids, max_new_tokens=args.tokens, engine=eng, return_dict_in_generate=True)
    prof.disable()
    print(out.stats)
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
