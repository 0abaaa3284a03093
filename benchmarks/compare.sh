#!/usr/bin/env bash
# tokenloom beside its peers, same machine, same GGUF, same workload, one run.
#
#   benchmarks/compare.sh                      tokenloom + every peer, the headline settings
#   PEERS="llama-server" benchmarks/compare.sh  a subset
#   PEERS="tokenloom-no-prefix-caching" ...     tokenloom against itself with the prefix cache off
#   PEERS="tokenloom-json-schema" ...           against itself with every answer held to a JSON schema
#   PEERS="tokenloom-ngram" ...                 against itself with n-gram speculative decoding
#                                               (NGRAM_SPEC_CONFIG, vLLM's --speculative-config JSON)
#   PEERS="tokenloom-offline" ...               against the same workload run offline, no HTTP
#                                               (`bench throughput --concurrency`): what serving costs
#
# Each server is started in turn on 127.0.0.1 (alone, so they never share the
# CPU), warmed up, driven by `python -m tokenloom.bench serve` with the same
# prompts (same seed) at the same concurrency levels, and stopped. Then one
# markdown table (OUT_DIR/table.md: every metric, plus tokenloom / peer ratios)
# and one HTML report (OUT_DIR/report.html) with all engines overlaid.
#
# Settings (env): CONCURRENCY=1,32  INPUT_LEN=256  OUTPUT_LEN=128  NUM_PROMPTS=32
# (per level)  MAX_SECONDS=120 (no new request after this long in a level: keeps
# the slow levels bounded)  OUT_DIR=benchmarks/results/compare-DATE  PORT=8300
# WORKLOAD_ARGS="" (more `bench serve` flags, e.g. "--workload shared-prefix ...").
# MODEL=smollm2-135m: an alias or a GGUF path, e.g. "$(benchmarks/random_gguf.sh)" for
# a 1B-shape Q4_K_M; TOKENLOOM_ARGS="" more `tokenloom serve` flags.
# Peers are installed on first use (benchmarks/peers/*.sh install).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${TOKENLOOM_PYTHON:-$ROOT/.venv/bin/python}"
PEERS="${PEERS:-llama-server llama-cpp-python transformers}"
CONCURRENCY="${CONCURRENCY:-1,32}"
INPUT_LEN="${INPUT_LEN:-256}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
NUM_PROMPTS="${NUM_PROMPTS:-32}"
MAX_SECONDS="${MAX_SECONDS:-120}"
MODEL="${MODEL:-smollm2-135m}"
export PEER_MODEL="${PEER_MODEL:-$MODEL}"  # the peers serve the same file
PORT="${PORT:-8300}"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/compare-$(date +%Y%m%d-%H%M%S)}"
START_TIMEOUT_S="${START_TIMEOUT_S:-600}"
WORKLOAD_ARGS="${WORKLOAD_ARGS:-}"
DEFAULT_NGRAM_SPEC_CONFIG='{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
NGRAM_SPEC_CONFIG="${NGRAM_SPEC_CONFIG:-$DEFAULT_NGRAM_SPEC_CONFIG}"  # JSON without single quotes
mkdir -p "$OUT_DIR"

server_pid=""
stop_server() {
    if [[ -n "$server_pid" ]]; then
        kill -- "-$server_pid" 2>/dev/null || true  # its own process group (setsid)
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}
trap stop_server EXIT

# The command line that serves the model for one engine.
server_command() {
    case "$1" in
        tokenloom) echo "$PY -m tokenloom.entrypoints.cli serve $MODEL --host 127.0.0.1 --port $PORT --log-stats-interval 0 ${TOKENLOOM_ARGS:-}" ;;
        tokenloom-no-prefix-caching) echo "$(server_command tokenloom) --no-prefix-caching" ;;
        tokenloom-json-schema) server_command tokenloom ;;
        # single quotes: the line runs through `bash -c`, which keeps the JSON one word
        tokenloom-ngram) echo "$(server_command tokenloom) --speculative-config '$NGRAM_SPEC_CONFIG'" ;;
        *) echo "$(peer_script "$1") serve $PORT" ;;
    esac
}

peer_script() {
    case "$1" in
        llama-server) echo "$ROOT/benchmarks/peers/llama_server.sh" ;;
        llama-cpp-python) echo "$ROOT/benchmarks/peers/llama_cpp_python.sh" ;;
        transformers) echo "$ROOT/benchmarks/peers/transformers_serve.sh" ;;
        *) echo "unknown engine: $1" >&2; exit 2 ;;
    esac
}

# Request fields each engine takes to force OUTPUT_LEN tokens (see docs/benchmarks.md).
bench_options() {
    case "$1" in
        tokenloom | tokenloom-no-prefix-caching | tokenloom-ngram | llama-server) echo "--force-output ignore_eos" ;;
        tokenloom-json-schema) echo "--force-output ignore_eos --response-format json-schema" ;;
        llama-cpp-python) echo "--force-output min_tokens" ;;  # it has min_tokens, no ignore_eos
        # transformers serve refuses ignore_eos and min_tokens but takes logit_bias: -100 on
        # SmolLM2's end tokens (<|endoftext|> 0, <|im_end|> 2) keeps it generating to max_tokens.
        # It names the model by its directory.
        transformers) echo "--force-output none --extra-body {\"logit_bias\":{\"0\":-100,\"2\":-100}}" \
                           "--model ${TOKENLOOM_PEERS_DIR:-${TOKENLOOM_HOME:-$HOME/.cache/tokenloom}/peers}/transformers-hf/$MODEL" ;;
    esac
}

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1; do
        if ! kill -0 "$server_pid" 2>/dev/null; then echo "$1 exited; see $OUT_DIR/$1.log" >&2; return 1; fi
        if ((SECONDS > deadline)); then echo "$1 did not start in ${START_TIMEOUT_S}s" >&2; return 1; fi
        sleep 1
    done
}

# The same levels and prompts through LLMEngine in this process: no server, no HTTP.
run_offline() {
    "$PY" -m tokenloom.bench throughput --model "$MODEL" --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN" \
        --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS" --label tokenloom-offline \
        --output-json "$OUT_DIR/tokenloom-offline.json" ${TOKENLOOM_OFFLINE_ARGS:-} >"$OUT_DIR/tokenloom-offline.log" 2>&1
}

results=()
for engine in tokenloom $PEERS; do
    echo "== $engine" >&2
    if [[ "$engine" == tokenloom-offline ]]; then
        run_offline
        results+=("$OUT_DIR/$engine.json")
        continue
    fi
    [[ "$engine" == tokenloom* ]] || "$(peer_script "$engine")" install >/dev/null
    setsid bash -c "exec $(server_command "$engine")" >"$OUT_DIR/$engine.log" 2>&1 &
    server_pid=$!
    wait_ready "$engine"
    # shellcheck disable=SC2046  # bench_options is a list of words
    "$PY" -m tokenloom.bench serve --base-url "http://127.0.0.1:$PORT/v1" --model "$MODEL" --tokenizer "$MODEL" \
        --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --num-prompts "$NUM_PROMPTS" --max-seconds "$MAX_SECONDS" --label "$engine" \
        --output-json "$OUT_DIR/$engine.json" $(bench_options "$engine") $WORKLOAD_ARGS
    results+=("$OUT_DIR/$engine.json")
    stop_server
done

"$PY" -m tokenloom.bench report "${results[@]}" --baseline tokenloom \
    --markdown "$OUT_DIR/table.md" --html "$OUT_DIR/report.html" \
    --title "tokenloom vs peers: input $INPUT_LEN, output $OUTPUT_LEN, concurrency $CONCURRENCY"
echo "table: $OUT_DIR/table.md  report: $OUT_DIR/report.html" >&2
