#!/usr/bin/env bash
# Issue 13's end-to-end table on the `bench` pair (a ~113M target whose forward dominates its
# launches), trained and measured inside one GPU call (about 8 minutes on an H200; the models are
# not committed: ~230 MB is over what a call can carry back):
#
#     bash benchmarks/bench_pair_in_call.sh OUT_DIR            # on the GPU
#     SIZE=smoke OVERRIDES= bash benchmarks/bench_pair_in_call.sh /tmp/b   # a CPU check of the script
#
# 1. python -m specdec.training.lm size=bench with a shortened schedule (OVERRIDES): corpus,
#    tokenizer, target, draft, distilled continuations, Medusa heads, an EAGLE-1/2 drafter;
# 2. benchmarks/bench_pairs.py on that folder: transformers' paths and every specdec proposer on the
#    same HumanEval prompts, same run (bf16, batch 1, greedy, no eager ablations); 3. below.
set -euo pipefail
out=${1:?usage: bench_pair_in_call.sh OUT_DIR}
size=${SIZE:-bench}
overrides=${OVERRIDES-size.target.max_minutes=2 size.draft.max_minutes=0.4 size.distill.num_sequences=512 size.medusa.steps=400 size.eagle.steps=800 size.eagle.checkpoint_every=400}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
# shellcheck disable=SC2086  # the overrides are separate words
python3 -P -m specdec.training.lm size="$size" out="$out/$size" work="$out/work" \
  "stages=${STAGES:-[corpus,tokenizer,target,draft,distill,medusa,eagle]}" $overrides
#    STAGES="[...]" trains fewer heads (the rows of missing heads are skipped).
#    WAIT_FOR=FILE waits until FILE exists before timing anything (a GPU test run in the same call
#    must not share the card with the measurements).
while [ -n "${WAIT_FOR:-}" ] && [ ! -e "$WAIT_FOR" ]; do sleep 2; done
#    ONLY="part,part" keeps the rows whose names hold a part (specdec plain always runs); TRACE=DIR
#    adds one torch.profiler call per specdec row (kernels and device busy time per step).
#    PROFILE=FILE appends a host cProfile of one call per specdec row (where the host's time goes).
SPECDEC_DEMO_DIR="$out/$size" python3 -P "$here/bench_pairs.py" --dtype "${DTYPE:-bfloat16}" --no-ablations \
  --prompts "${PROMPTS:-10}" --new-tokens "${NEW_TOKENS:-128}" --out "$out/pairs_$size.json" \
  ${ONLY:+--only "$ONLY"} ${TRACE:+--trace "$TRACE"} ${PROFILE:+--profile "$PROFILE"}
# 3. at T = 1 (T1=0 skips it): EAGLE's sampled trees against its top-k trees and specdec plain, the
#    measurement behind the default tree at T > 0 on a pair whose target forward dominates
if [ "${T1:-1}" != 0 ]; then
  SPECDEC_DEMO_DIR="$out/$size" python3 -P "$here/bench_pairs.py" --dtype "${DTYPE:-bfloat16}" --no-ablations \
    --temperature 1 --only "Eagle(6, 10, 60)" --prompts "${PROMPTS:-10}" --new-tokens "${NEW_TOKENS:-128}" \
    --out "$out/pairs_${size}_t1.json"
fi
