#!/usr/bin/env bash
# Prefix caching on vs off over HTTP, the shared-prefix workload of the issue:
# a 1024-token shared system prompt + 32-token distinct questions, 64 requests,
# concurrency 16, 64 output tokens, default model. One run of compare.sh with
# tokenloom against itself started with --no-prefix-caching.
#
#   benchmarks/prefix_cache_serve.sh        -> OUT_DIR/table.md (tokenloom vs tokenloom-no-prefix-caching)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PEERS=tokenloom-no-prefix-caching CONCURRENCY=16 INPUT_LEN=32 OUTPUT_LEN=64 NUM_PROMPTS=64
export MAX_SECONDS="${MAX_SECONDS:-3600}"  # every request runs; the cache-off level takes minutes
export WORKLOAD_ARGS="--workload shared-prefix --shared-prefix-len 1024"
export OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/prefix-cache-$(date +%Y%m%d-%H%M%S)}"
exec "$ROOT/benchmarks/compare.sh"
