#!/usr/bin/env bash
# llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`).
#
#   llama_cpp_python.sh install      pip-builds llama-cpp-python[server] into its own venv
#                                    under $PEERS_DIR (compiles llama.cpp: several minutes)
#   llama_cpp_python.sh serve PORT   run it in the foreground on 127.0.0.1:PORT
#
# The server runs one request at a time (no batching across requests), so its
# throughput does not grow with concurrency. By default it interrupts a running
# stream when another request arrives; --interrupt_requests False lets every
# stream finish, which a benchmark under concurrency needs. Context: LLAMA_CTX=2048
# (one sequence at a time, so no slots to split it over); batch 512; all cores.
# It takes `min_tokens` (forces the output length), not `ignore_eos`.
source "$(dirname "$0")/common.sh"

LLAMA_CPP_PYTHON_VERSION=0.3.36

install() {
    local venv
    venv="$(peer_venv llama-cpp-python)"
    if ! "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$THREADS" \
            "$venv/bin/pip" install --quiet "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
    fi
    echo "$venv"
}

serve() {
    local port="$1" venv
    venv="$(install)"
    exec "$venv/bin/python" -m llama_cpp.server --model "$(model_path)" --model_alias "$MODEL_ALIAS" \
        --host "$HOST" --port "$port" --n_threads "$THREADS" --n_threads_batch "$THREADS" \
        --n_ctx "${LLAMA_CTX:-2048}" --n_batch 512 --interrupt_requests False
}

case "${1:-}" in
    install) install ;;
    serve) [[ $# -eq 2 ]] || usage_and_exit; serve "$2" ;;
    *) usage_and_exit ;;
esac
