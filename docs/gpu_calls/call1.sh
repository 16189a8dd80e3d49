#!/usr/bin/env bash
# call 1: make test-gpu on gpu-next (main + the three docs/patches), the demo pair's specdec rows,
# graph_replay.py (each captured graph replayed alone) and a trace of plain, EAGLE (6, 10, 60) and chain(5)
set -u
end=$((SECONDS + ${BUDGET:-560}))
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/card.txt 2>&1
git log --oneline -6 > $OUT/commit.txt 2>&1; git status --short >> $OUT/commit.txt
make -s gpu-site PYTHON=python3 > /dev/null
export PYTHONPATH=/tmp/specdec-gpu-site
export SPECDEC_DEMO_DIR=$PWD/assets/demo
t0=$SECONDS
timeout $((end - SECONDS - 300)) python3 -P -m pytest -q -p no:cacheprovider -m gpu tests -rfE > $OUT/gpu_tests.txt 2>&1
echo "rc=$? seconds=$((SECONDS - t0))" >> $OUT/gpu_tests.txt
tail -4 $OUT/gpu_tests.txt
t0=$SECONDS
timeout 150 python3 -P benchmarks/bench_pairs.py --dtype bfloat16 --no-ablations \
  --prompts 10 --new-tokens 128 --only "specdec" --out $OUT/pairs_demo.json > $OUT/pairs_demo.txt 2>&1
echo "demo rc=$? seconds=$((SECONDS - t0))"; grep -v "it/s" $OUT/pairs_demo.txt | tail -20
left=$((end - SECONDS - 10))
t0=$SECONDS
[ $left -gt 30 ] && timeout $(( left < 100 ? left : 100 )) python3 -P benchmarks/graph_replay.py --out $OUT/graph_replay.json > $OUT/graph_replay.txt 2>&1
echo "replay rc=$? seconds=$((SECONDS - t0))"; grep -v "step tail" $OUT/graph_replay.txt | cut -c1-150 | head -60
left=$((end - SECONDS - 10))
[ $left -gt 40 ] && timeout $left python3 -P benchmarks/bench_pairs.py --dtype bfloat16 --no-ablations \
  --prompts 10 --new-tokens 128 --only "specdec plain,Eagle(6, 10, 60),Eagle chain(5)" \
  --trace /tmp/tr --out $OUT/pairs_demo_trace.json > $OUT/pairs_demo_trace.txt 2>&1
echo "trace rc=$?"
mkdir -p $OUT/kernels && cp /tmp/tr/*.kernels.txt $OUT/kernels/ 2>/dev/null
for f in $OUT/kernels/*.txt; do sed -n 1,2p $f | cut -c1-300; done
