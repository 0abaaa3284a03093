#!/usr/bin/env bash
# What structured output costs over HTTP: the default model answering freely against
# the same prompts answered under a JSON schema (bench serve --response-format
# json-schema: 64+ records, so every answer still runs to OUTPUT_LEN), concurrency 1
# and 32, one run of compare.sh with tokenloom against itself.
#
#   benchmarks/structured_output_serve.sh    -> OUT_DIR/table.md (tokenloom vs tokenloom-json-schema)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PEERS=tokenloom-json-schema CONCURRENCY="${CONCURRENCY:-1,32}" INPUT_LEN="${INPUT_LEN:-256}"
export OUTPUT_LEN="${OUTPUT_LEN:-128}" NUM_PROMPTS="${NUM_PROMPTS:-32}" MAX_SECONDS="${MAX_SECONDS:-60}"
export OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/structured-output-$(date +%Y%m%d-%H%M%S)}"
exec "$ROOT/benchmarks/compare.sh"
