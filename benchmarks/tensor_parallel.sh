#!/usr/bin/env bash
# Tensor parallelism on this machine's CPU: the same offline throughput run
# (`tokenloom bench throughput`) at --tensor-parallel-size 1 and 2, alternated within one
# run (this VM drifts), on two models:
#   default   the default model (SmolLM2-135M Q4_1, native kernels), batch 1 and 16
#   1b        random weights of the Llama-3.2-1B shape in int8 blocks (--load-format dummy
#             --quantization int8), batch 1 and 8
# Then the ratio TP=2 / TP=1 of each figure (above 1: TP=2 is faster).
#
#   benchmarks/tensor_parallel.sh [default|1b ...]   -> OUT_DIR/{model}-b{batch}-tp{1,2}.json, ratios.md
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${TOKENLOOM_PYTHON:-$ROOT/.venv/bin/python}"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/tensor-parallel-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
MODELS=("${@:-default 1b}")

run() {  # name batch input output tp args...
  local name=$1 batch=$2 input=$3 output=$4 tp=$5
  shift 5
  "$PY" -m tokenloom.bench throughput --num-prompts "$batch" --input-len "$input" --output-len "$output" \
    -tp "$tp" --output-json "$OUT_DIR/$name-b$batch-tp$tp.json" "$@" 2>/dev/null | sed "s/^/[$name b$batch tp$tp] /"
}

for model in ${MODELS[@]}; do
  case $model in
    default) args=(--model smollm2-135m); shapes=("1 128 64" "16 128 64") ;;
    1b) args=(--model llama-3.2-1b --load-format dummy --quantization int8 --kv-cache-memory 1); shapes=("1 128 32" "8 128 32") ;;
    *) echo "unknown model $model (default, 1b)" >&2; exit 2 ;;
  esac
  for shape in "${shapes[@]}"; do
    read -r batch input output <<<"$shape"
    for tp in 1 2; do run "$model" "$batch" "$input" "$output" "$tp" "${args[@]}"; done
  done
done

"$PY" - "$OUT_DIR" <<'PYEOF' | tee "$OUT_DIR/ratios.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | TP=1 prefill / decode tok/s | TP=2 prefill / decode tok/s | TP=2 / TP=1 prefill | decode |")
print("|---|---|---|---|---|")
for one in sorted(out.glob("*-tp1.json")):
    two = one.with_name(one.name.replace("-tp1", "-tp2"))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    print(f"| {one.name.removesuffix('-tp1.json')} | {a['prefill_tok_per_s']:.0f} / {a['decode_tok_per_s']:.1f} "
          f"| {b['prefill_tok_per_s']:.0f} / {b['decode_tok_per_s']:.1f} "
          f"| {b['prefill_tok_per_s'] / a['prefill_tok_per_s']:.2f} | {b['decode_tok_per_s'] / a['decode_tok_per_s']:.2f} |")
PYEOF
