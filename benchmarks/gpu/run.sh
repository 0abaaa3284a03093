#!/usr/bin/env bash
# One call on the lent GPU machine (../shared/GPU.md): the CUDA tests, then tokenloom
# and transformers on the 1B and 8B shapes, in/out 256/128. Results land in $OUT.
#
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=560)
#
# PARTS picks what runs (default below), for a rerun. Issue 15's parts: tl1b and tl8b
# run with CUDA graphs and async scheduling (the defaults), tl1b-eager without either
# (the before); serve8b is the seeds' workload over HTTP (in/out 2048/2048, c=1 and 100)
# beside the same levels offline. Everything is more than one call's 10 minutes: run
# the default PARTS, then PARTS=serve8b.
set -u
OUT=${OUT:-/tmp/tokenloom-gpu}
mkdir -p "$OUT"
PARTS=${PARTS:-"tests tl1b tl1b-eager tl8b"}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD/src:$PWD TOKENLOOM_KERNELS=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

part() { [[ " $PARTS " == *" $1 "* ]]; }
if part tests; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider --maxfail=8 \
    tests/triton tests/model/test_triton_backend.py tests/engine/test_cuda_step.py \
    tests/model/test_static_decode.py tests/engine/test_async_scheduling.py \
    tests/engine/test_dummy_weights.py \
    > "$OUT/pytest.txt" 2>&1
  tail -25 "$OUT/pytest.txt"
fi
part tl1b && timeout 100 python3 benchmarks/gpu/throughput.py llama-3.2-1b --batches 1,64,256 \
  --profile-batches 1,64 2>"$OUT/tl-1b.err" | tee "$OUT/tl-1b.jsonl" | grep -v "^ \|^-\|^Name" ; tail -3 "$OUT/tl-1b.err"
part hf1b && timeout 80 python3 benchmarks/gpu/hf_peer.py benchmarks/shapes/llama-3.2-1b.json --eager-batches 1 \
  --batches 64,256 2>"$OUT/hf-1b.err" | tee "$OUT/hf-1b.jsonl"; tail -3 "$OUT/hf-1b.err"
part tl8b && timeout 100 python3 benchmarks/gpu/throughput.py llama-3.1-8b --batches 1,64,256 \
  --profile-batches 1 2>"$OUT/tl-8b.err" | tee "$OUT/tl-8b.jsonl" | grep -v "^ \|^-\|^Name"; tail -3 "$OUT/tl-8b.err"
part tl1b-eager && timeout 100 python3 benchmarks/gpu/throughput.py llama-3.2-1b --batches 1,256 \
  --profile-batches 1 --enforce-eager --no-async-scheduling 2>"$OUT/tl-1b-eager.err" | tee "$OUT/tl-1b-eager.jsonl" \
  | grep -v "^ \|^-\|^Name"; tail -3 "$OUT/tl-1b-eager.err"
if part serve8b; then
  python3 -m tokenloom.entrypoints.cli serve llama-3.1-8b --load-format dummy --port 8400 --log-stats-interval 0 \
    > "$OUT/serve-8b.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8400/v1/models > /dev/null && break; sleep 1; done
  for level in 1 100; do
    n=$([[ $level == 1 ]] && echo 3 || echo 100)
    timeout 150 python3 -m tokenloom.bench serve --base-url http://127.0.0.1:8400/v1 --model llama-3.1-8b \
      --concurrency $level --input-len 2048 --output-len 2048 --num-prompts $n --max-seconds 60 --quiet \
      --output-json "$OUT/serve-8b-c$level.json" 2>&1 | grep "c=$level:"
  done
  kill $server; wait $server
  for level in 1 100; do
    n=$([[ $level == 1 ]] && echo 3 || echo 100)
    timeout 150 python3 -m tokenloom.bench throughput --model llama-3.1-8b --load-format dummy --concurrency $level \
      --input-len 2048 --output-len 2048 --num-prompts $n --output-json "$OUT/offline-8b-c$level.json" 2>&1 | grep "| c="
  done
fi
part hf8b && timeout 70 python3 benchmarks/gpu/hf_peer.py benchmarks/shapes/llama-3.1-8b.json --eager-batches 1 \
  --batches 64 2>"$OUT/hf-8b.err" | tee "$OUT/hf-8b.jsonl"; tail -3 "$OUT/hf-8b.err"
exit 0
