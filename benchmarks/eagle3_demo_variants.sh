#!/usr/bin/env bash
# EAGLE-3 drafters for the demo pair, trained side by side in one GPU call; the one with the best
# held-out selection tau (the trainer's own choice: held-out code, never HumanEval) is copied to
# OUT/best/; each variant's log tail and selection taus are printed (issue 17):
#
#     bash benchmarks/eagle3_demo_variants.sh OUT "VARIANT_A overrides" "VARIANT_B overrides" ...
#
# Each variant is a quoted list of hydra overrides of size.eagle3 (e.g. "size.eagle3.draft_vocab_size=8192").
# The corpus and the distilled continuations are made once (stages corpus, distill) and copied to each
# variant's work folder; the 9.5M target leaves the GPU mostly idle, so the variants run at once.
# Needs hydra on the path: the device image lacks it, so carry hydra-core, omegaconf and
# antlr4-python3-runtime 4.9.3 as wheels (docs/notes.md, 2026-12-06, says how).
set -euo pipefail
out=${1:?usage: eagle3_demo_variants.sh OUT "overrides" ...}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
base=$(mktemp -d)
cp -r "$root/assets/demo" "$base/demo" && rm -rf "$base/demo/eagle3"
mkdir -p "$out"
python3 -P -m specdec.training.lm size=demo out="$base/demo" work="$base/work" 'stages=[corpus,distill]' \
  > "$base/prepare.log" 2>&1 || { tail -30 "$base/prepare.log"; exit 1; }
i=0
for overrides in "$@"; do
  i=$((i + 1))
  cp -r "$base/demo" "$base/v$i" && cp -r "$base/work" "$base/work$i"
  # shellcheck disable=SC2086  # the overrides are separate words
  python3 -P -m specdec.training.lm size=demo out="$base/v$i" work="$base/work$i" 'stages=[eagle3]' $overrides \
    > "$base/variant$i.log" 2>&1 &
done
wait
best=0 best_tau=0
for v in $(seq 1 "$i"); do
  tail -4 "$base/variant$v.log"
  sel="$base/v$v/eagle3/selection.json"
  tau=$(python3 -c "import json,sys; print(max(json.load(open(sys.argv[1])).values()))" "$sel")
  echo "variant $v: held-out selection tau per checkpoint $(tr -d ' \n' < "$sel"), best $tau"
  if python3 -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$tau" "$best_tau"; then
    best=$v best_tau=$tau
  fi
done
echo "best: variant $best ($best_tau)"
mkdir -p "$out/best" && cp "$base/v$best/eagle3/"{config.json,model.safetensors,selection.json} "$out/best/"
