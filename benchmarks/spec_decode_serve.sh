#!/usr/bin/env bash
# N-gram (prompt lookup) speculative decoding on vs off over HTTP, default model:
# tokenloom against itself started with
#   --speculative-config '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
# (compare.sh's tokenloom-ngram; NGRAM_SPEC_CONFIG overrides the JSON), on two workloads:
#   copy  16 requests to repeat or lightly edit a paragraph or code block, concurrency 1 and 16:
#         the answer is mostly in the prompt, where speculation should win
#   open  16 open-ended requests (stories, explanations), concurrency 1: nothing to look
#         up, so what speculation costs when it cannot help
# Chat endpoint, temperature 0, up to 160 output tokens, the model free to stop at EOS
# (--force-output none; output counts from the server's usage), every answer saved
# (--save-texts). Two runs of compare.sh; then, per workload, the ratios
# tokenloom-ngram / tokenloom (above 1 for throughput, below 1 for latency: speculation
# is ahead) and whether the two servers' texts are identical, request by request.
#
#   benchmarks/spec_decode_serve.sh   -> OUT_DIR/{copy,open}/speedup.md, texts.txt (and compare.sh's files)
#
# Exit status 1 when some texts differ (greedy decoding with speculation must give the
# same text; the figures are printed either way).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${TOKENLOOM_PYTHON:-$ROOT/.venv/bin/python}"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/spec-decode-$(date +%Y%m%d-%H%M%S)}"
export PEERS=tokenloom-ngram OUTPUT_LEN="${OUTPUT_LEN:-160}" NUM_PROMPTS="${NUM_PROMPTS:-16}"
export MAX_SECONDS="${MAX_SECONDS:-3600}"  # every request runs, so that texts compare one to one
# After compare.sh's own --force-output ignore_eos, so these win (argparse keeps the last).
# input_len does not apply to copy and open: a prompt is its instruction and passage.
COMMON_ARGS="--endpoint chat --temperature 0 --force-output none --save-texts"

run_workload() {  # WORKLOAD CONCURRENCY
    OUT_DIR="$OUT_DIR/$1" CONCURRENCY="$2" WORKLOAD_ARGS="--workload $1 $COMMON_ARGS" "$ROOT/benchmarks/compare.sh"
}

run_workload copy 1,16
run_workload open 1

status=0
for workload in copy open; do
    dir="$OUT_DIR/$workload"
    echo
    echo "# $workload: tokenloom-ngram / tokenloom"
    "$PY" -m tokenloom.bench report "$dir/tokenloom.json" "$dir/tokenloom-ngram.json" \
        --baseline tokenloom-ngram --markdown "$dir/speedup.md"
    rc=0
    "$PY" -m tokenloom.bench compare-texts "$dir/tokenloom.json" "$dir/tokenloom-ngram.json" >"$dir/texts.txt" || rc=$?
    case "$rc" in
        0) echo "texts: identical" ;;
        1) echo "texts: DIFFER"; status=1 ;;
        *) echo "texts: could not be compared (exit $rc)"; status="$rc" ;;
    esac
    cat "$dir/texts.txt"
done
echo "results: $OUT_DIR" >&2
exit "$status"
