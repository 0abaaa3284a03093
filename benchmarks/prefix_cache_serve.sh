#!/usr/bin/env bash
# Prefix caching on vs off over HTTP, the shared-prefix workload of the issue:
# a 1024-token shared system prompt + 32-token distinct questions, 64 requests,
# concurrency 16, 64 output tokens, default model. One run, both servers in turn.
#
#   benchmarks/prefix_cache_serve.sh        -> OUT_DIR/table.md (cache-on vs cache-off)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${TOKENLOOM_PYTHON:-$ROOT/.venv/bin/python}"
PORT="${PORT:-8310}"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/prefix-cache-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"

server_pid=""
stop_server() {
    if [[ -n "$server_pid" ]]; then
        kill -- "-$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}
trap stop_server EXIT

run() {  # label, extra serve flags...
    local label="$1"; shift
    setsid "$PY" -m tokenloom.entrypoints.cli serve smollm2-135m --port "$PORT" --log-stats-interval 0 \
        --log-level warning "$@" &
    server_pid=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        sleep 0.5
    done
    "$PY" -m tokenloom.bench serve --base-url "http://127.0.0.1:$PORT/v1" --model smollm2-135m \
        --workload shared-prefix --shared-prefix-len 1024 --input-len 32 --output-len 64 \
        --num-prompts 64 --concurrency 16 --temperature 0 --label "$label" --quiet \
        --output-json "$OUT_DIR/$label.json"
    stop_server
}

run tokenloom
run no-prefix-caching --no-prefix-caching
"$PY" -m tokenloom.bench report "$OUT_DIR/tokenloom.json" "$OUT_DIR/no-prefix-caching.json" \
    --markdown "$OUT_DIR/table.md" --html "$OUT_DIR/report.html"
cat "$OUT_DIR/table.md"
