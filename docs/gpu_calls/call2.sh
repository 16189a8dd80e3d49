#!/usr/bin/env bash
# call 2: the bench pair trained and measured in one call (transformers' rows and specdec's, same run)
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/card.txt 2>&1
git log --oneline -3 > $OUT/commit.txt 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.txt 2>&1
make -s gpu-site PYTHON=python3 > /dev/null
export PYTHONPATH=/tmp/specdec-gpu-site:/tmp/site
T1=0 timeout ${BUDGET:-575} bash benchmarks/bench_pair_in_call.sh /tmp/bp > $OUT/bench_pair.txt 2>&1
echo "rc=$? s=$SECONDS" >> $OUT/bench_pair.txt
cp /tmp/bp/pairs_bench.json $OUT/ 2>/dev/null
grep -v "it/s" $OUT/bench_pair.txt | tail -30
