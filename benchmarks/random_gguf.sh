#!/usr/bin/env bash
# A GGUF of random weights in a named shape, made as a new user makes one:
# random_model.py writes a Hugging Face directory, llama.cpp's own converter
# turns it into a GGUF, llama-quantize (same vendored sources as the
# llama-server peer) quantizes it.
#
#   benchmarks/random_gguf.sh [SHAPE] [TYPE]     prints the GGUF's path
#
# SHAPE: a file in benchmarks/shapes/ without .json (default llama-3.2-1b);
# TYPE: Q8_0 (converter), or any llama-quantize type: Q4_K_M (default), Q4_0, ...
# Files land in $TOKENLOOM_HOME/models (default ~/.cache/tokenloom/models) as
# random-SHAPE.TYPE.gguf and are reused. Seed 0: the same bytes every time.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${TOKENLOOM_PYTHON:-$ROOT/.venv/bin/python}"
SHAPE="${1:-llama-3.2-1b}"
TYPE="${2:-Q4_K_M}"
MODELS="${TOKENLOOM_HOME:-$HOME/.cache/tokenloom}/models"
OUT="$MODELS/random-$SHAPE.$TYPE.gguf"
PEER="$ROOT/benchmarks/peers/llama_server.sh"

if [[ -f "$OUT" ]]; then echo "$OUT"; exit 0; fi
mkdir -p "$MODELS"
work="$(mktemp -d "$MODELS/.random-$SHAPE.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$PY" "$ROOT/benchmarks/random_model.py" "$ROOT/benchmarks/shapes/$SHAPE.json" "$work/hf" >&2
if [[ "$TYPE" == Q8_0 ]]; then
    "$PEER" convert "$work/hf" "$work/out.gguf" q8_0 >&2
else
    "$PEER" convert "$work/hf" "$work/f16.gguf" f16 >&2
    "$PEER" quantize "$work/f16.gguf" "$work/out.gguf" "$TYPE" >&2
fi
mv "$work/out.gguf" "$OUT"
echo "$OUT"
