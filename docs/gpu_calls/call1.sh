#!/usr/bin/env bash
# call 1: make test-gpu on gpu-next (main + docs/patches/big-batch.patch), then the demo pair's specdec rows
set -u
end=$((SECONDS + ${BUDGET:-540}))
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/card.txt 2>&1
git log --oneline -3 > $OUT/commit.txt 2>&1; git status --short >> $OUT/commit.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.txt 2>&1
make -s gpu-site PYTHON=python3 > /dev/null
export PYTHONPATH=/tmp/specdec-gpu-site:/tmp/site
t0=$SECONDS
SPECDEC_DEMO_DIR=$PWD/assets/demo timeout $((end - SECONDS - 150)) python3 -P -m pytest -q -p no:cacheprovider -m gpu tests -rfE > $OUT/gpu_tests.txt 2>&1
echo "rc=$? seconds=$((SECONDS - t0))" >> $OUT/gpu_tests.txt
tail -3 $OUT/gpu_tests.txt
left=$((end - SECONDS - 10))
echo "left for demo rows: $left s"
[ $left -gt 40 ] && SPECDEC_DEMO_DIR=$PWD/assets/demo timeout $left python3 -P benchmarks/bench_pairs.py --dtype bfloat16 --no-ablations \
  --prompts 10 --new-tokens 128 --only "specdec" --out $OUT/pairs_demo.json > $OUT/pairs_demo.txt 2>&1
echo "demo rc=$?"; cat $OUT/pairs_demo.txt | tail -25
