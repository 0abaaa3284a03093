#!/usr/bin/env bash
# Resident memory of tokenloom and llama-server on the same GGUF, in one run: each
# loads MODEL (default settings; llama-server as compare.sh starts it: -c 8192
# --parallel 8 -t 2), answers one completion of ~256 tokens in / 64 out, and
# reports its RSS then and its peak (VmHWM).
#
#   benchmarks/server_memory.sh MODEL.gguf
set -euo pipefail
MODEL=$1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LLAMA_SERVER="$("$ROOT/benchmarks/peers/llama_server.sh" install | tail -1)"  # built once, then its path
rss() { awk '/VmRSS/ {printf "%.2f GiB", $2/1048576}' /proc/$1/status; }
hwm() { awk '/VmHWM/ {printf "%.2f GiB", $2/1048576}' /proc/$1/status; }
ask() { curl -s localhost:$1/v1/completions -H 'content-type: application/json' -d "{\"model\":\"m\",\"prompt\":\"$(python3 -c 'print(" ".join(["word"]*250))')\",\"max_tokens\":64,\"temperature\":0,\"ignore_eos\":true}" > /dev/null; }
"${TOKENLOOM_PYTHON:-$ROOT/.venv/bin/python}" -m tokenloom.entrypoints.cli serve "$MODEL" --port 8801 --served-model-name m --log-level warning & TL=$!
"$LLAMA_SERVER" -m "$MODEL" --port 8802 -c 8192 --parallel 8 -t 2 > /dev/null 2>&1 & LS=$!
for port in 8801 8802; do until curl -sf localhost:$port/health > /dev/null; do sleep 0.5; done; done
ask 8801; ask 8802
echo "tokenloom: RSS $(rss $TL), peak $(hwm $TL)"
echo "llama-server: RSS $(rss $LS), peak $(hwm $LS)"
kill $TL $LS; wait 2>/dev/null || true
