#!/usr/bin/env bash
# call 3: the demo pair's EAGLE rows under torch.profiler (kernels per step: per-level drafting cost of trees and chains)
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/card.txt 2>&1
git log --oneline -2 > $OUT/commit.txt 2>&1; git status --short >> $OUT/commit.txt
make -s gpu-site PYTHON=python3 > /dev/null
export PYTHONPATH=/tmp/specdec-gpu-site
SPECDEC_DEMO_DIR=$PWD/assets/demo timeout 270 python3 -P benchmarks/bench_pairs.py --dtype bfloat16 --no-ablations \
  --prompts 10 --new-tokens 128 --only "specdec plain,Eagle(3, 4, 15),Eagle(6, 10, 60),Eagle chain,DraftModel(4)" \
  --trace /tmp/tr --profile $OUT/host_profile.txt --out $OUT/pairs_demo_trace.json > $OUT/pairs_demo_trace.txt 2>&1
echo "rc=$?"
mkdir -p $OUT/kernels && cp /tmp/tr/*.kernels.txt $OUT/kernels/ 2>/dev/null
grep -v "it/s" $OUT/pairs_demo_trace.txt | grep -v "trace:" | tail -14
for f in $OUT/kernels/*.txt; do sed -n 1,2p $f | cut -c1-400; done
