#!/usr/bin/env bash
# What serving over HTTP adds to each token: the same workload offline (no server, no
# HTTP: `bench throughput --concurrency`) and through `tokenloom serve` (`bench serve`),
# in alternating rounds, since this machine's speed drifts by more than the effect.
#
#   benchmarks/serve_overhead.sh                         served vs offline, 3 rounds
#   BASELINE_SRC=/path/to/other/checkout/src benchmarks/serve_overhead.sh
#                                                        also serve that checkout's code
#                                                        (e.g. a git worktree of an older commit)
#
# Settings (env): MODEL=smollm2-135m CONCURRENCY=1,64 INPUT_LEN=256 OUTPUT_LEN=128
# ROUNDS=3 NUM_PROMPTS_C1=24 NUM_PROMPTS=128 (per level above 1) PORT=8310
# OUT_DIR=benchmarks/results/serve-overhead-DATE. Prints TPOT p50 and ITL p50 per round
# and their medians, with served / offline (issue 15's target: TPOT within 1.10).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${TOKENLOOM_PYTHON:-$ROOT/.venv/bin/python}"
MODEL="${MODEL:-smollm2-135m}"
CONCURRENCY="${CONCURRENCY:-1,64}"
INPUT_LEN="${INPUT_LEN:-256}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
ROUNDS="${ROUNDS:-3}"
NUM_PROMPTS_C1="${NUM_PROMPTS_C1:-24}"
NUM_PROMPTS="${NUM_PROMPTS:-128}"
PORT="${PORT:-8310}"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/serve-overhead-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
cd "$ROOT"

server_pid=""
stop_server() {
    if [[ -n "$server_pid" ]]; then
        kill -- "-$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}
trap stop_server EXIT

prompts_for() { [[ "$1" == 1 ]] && echo "$NUM_PROMPTS_C1" || echo "$NUM_PROMPTS"; }

run_offline() {  # round, level
    "$PY" -m tokenloom.bench throughput --model "$MODEL" --concurrency "$2" --input-len "$INPUT_LEN" \
        --output-len "$OUTPUT_LEN" --num-prompts "$(prompts_for "$2")" --label offline \
        --output-json "$OUT_DIR/offline-c$2-r$1.json" >>"$OUT_DIR/offline.log" 2>&1
}

run_served() {  # label, python path, round
    PYTHONPATH="$2" setsid "$PY" -m tokenloom.entrypoints.cli serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
        --log-stats-interval 0 >>"$OUT_DIR/$1.log" 2>&1 &
    server_pid=$!
    until curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1; do
        kill -0 "$server_pid" 2>/dev/null || { echo "$1 exited; see $OUT_DIR/$1.log" >&2; exit 1; }
        sleep 1
    done
    for level in ${CONCURRENCY//,/ }; do
        "$PY" -m tokenloom.bench serve --base-url "http://127.0.0.1:$PORT/v1" --model "$MODEL" --tokenizer "$MODEL" \
            --concurrency "$level" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
            --num-prompts "$(prompts_for "$level")" --label "$1" --force-output ignore_eos --quiet \
            --output-json "$OUT_DIR/$1-c$level-r$3.json" >/dev/null 2>&1
    done
    stop_server
}

for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round" >&2
    for level in ${CONCURRENCY//,/ }; do run_offline "$round" "$level"; done
    run_served served "$ROOT/src" "$round"
    [[ -z "${BASELINE_SRC:-}" ]] || run_served baseline "$BASELINE_SRC" "$round"
done

"$PY" - "$OUT_DIR" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {}  # (label, level) -> [(tpot p50, itl p50)]
for f in sorted(out.glob("*-c*-r*.json")):
    label, level = f.stem.rsplit("-r", 1)[0].rsplit("-c", 1)
    s = json.loads(f.read_text())["levels"][0]["summary"]
    runs.setdefault((label, int(level)), []).append((s["tpot_ms"]["p50"], s["itl_ms"]["p50"]))
print("| level | engine | TPOT p50 ms, each round | median | / offline | ITL p50 ms median | / offline |")
print("|---|---|---|---|---|---|---|")
for level in sorted({lv for _, lv in runs}):
    base = runs[("offline", level)]
    base_tpot, base_itl = (statistics.median(x[i] for x in base) for i in (0, 1))
    for label in ("offline", "served", "baseline"):
        if (label, level) not in runs:
            continue
        rows = runs[(label, level)]
        tpot, itl = (statistics.median(x[i] for x in rows) for i in (0, 1))
        each = " ".join(f"{x[0]:.2f}" for x in rows)
        print(f"| c={level} | {label} | {each} | {tpot:.2f} | {tpot / base_tpot:.2f} | {itl:.2f} | {itl / base_itl:.2f} |")
EOF
