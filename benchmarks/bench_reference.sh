#!/usr/bin/env bash
# The `bench` reference pair, trained and profiled end to end inside one GPU call (about 8 minutes on
# an H200; the models are not committed, this script is):
#
#     bash benchmarks/bench_reference.sh OUT_DIR [HumanEval.jsonl.gz]
#
# 1. python -m specdec.training.lm size=bench: a ~113M Llama target and a ~9M draft on Python source
#    (corpus, tokenizer, target, draft stages; model cards in OUT_DIR/bench/{target,draft}/README.md);
# 2. specdec profile on 20 HumanEval prompts, bf16, batch 1, 128 new tokens, greedy: plain decoding and
#    speculation (draft model, n-gram) through the same engine in the same run (report.json each).
set -euo pipefail
out=${1:?usage: bench_reference.sh OUT_DIR [HumanEval.jsonl.gz]}
he=${2:-data/HumanEval.jsonl.gz}
he=$(realpath "$he")
mkdir -p "$out"
python3 -m specdec.training.lm size=bench out="$out/bench" work=/tmp/specdec_bench_work \
  "stages=[corpus,tokenizer,target,draft]" humaneval="$he"
for p in draft ngram; do
  python3 -m specdec.cli profile --target "$out/bench/target" --proposer "$p" --draft "$out/bench/draft" \
    --prompts "$he" --limit 20 --max-new-tokens 128 --dtype bfloat16 --out "$out/profile_$p" --quiet
done
