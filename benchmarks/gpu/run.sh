#!/usr/bin/env bash
# One call on the lent GPU machine (../shared/GPU.md): the CUDA tests, then tokenloom
# and transformers on the 1B and 8B shapes, in/out 256/128. Results land in $OUT.
#
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=560)
#
# PARTS (default "tests tl1b hf1b tl8b hf8b") picks what runs, for a rerun.
set -u
OUT=${OUT:-/tmp/tokenloom-gpu}
mkdir -p "$OUT"
PARTS=${PARTS:-"tests tl1b hf1b tl8b"}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD/src:$PWD TOKENLOOM_KERNELS=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

part() { [[ " $PARTS " == *" $1 "* ]]; }
if part tests; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider --maxfail=8 \
    tests/triton tests/model/test_triton_backend.py tests/engine/test_cuda_step.py \
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
part hf8b && timeout 70 python3 benchmarks/gpu/hf_peer.py benchmarks/shapes/llama-3.1-8b.json --eager-batches 1 \
  --batches 64 2>"$OUT/hf-8b.err" | tee "$OUT/hf-8b.jsonl"; tail -3 "$OUT/hf-8b.err"
exit 0
