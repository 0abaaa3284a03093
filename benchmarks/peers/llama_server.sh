#!/usr/bin/env bash
# llama.cpp's own C++ server (`llama-server`), built from the llama.cpp sources
# vendored in the llama-cpp-python sdist on PyPI (0.3.36 vendors llama.cpp 0c1e570).
#
#   llama_server.sh install      build once into $PEERS_DIR/llama.cpp (~4 min on 2 cores)
#   llama_server.sh serve PORT   run it in the foreground on 127.0.0.1:PORT
#   llama_server.sh perplexity FILE [N_CTX]
#                                llama-perplexity on the default model (builds that
#                                tool too), the method `tokenloom bench perplexity` copies;
#                                MODEL_FILE=x.gguf runs it on another file
#   llama_server.sh quantize IN.gguf OUT.gguf TYPE
#                                llama-quantize (--allow-requantize), e.g. TYPE Q4_K_M
#   llama_server.sh convert HF_DIR OUT.gguf OUTTYPE
#                                llama.cpp's convert_hf_to_gguf.py (OUTTYPE f16, bf16,
#                                q8_0, ...), run by tokenloom's python (torch, gguf,
#                                transformers: all it needs)
#
# Settings (override with env): LLAMA_SLOTS=32 parallel slots (continuous
# batching across them), LLAMA_CTX=16384 total context, split evenly across
# slots, so each slot holds LLAMA_CTX / LLAMA_SLOTS = 512 tokens: enough for
# input 256 + output 128. Raise LLAMA_CTX with longer workloads.
# `-t` threads = all cores. llama-server honours `ignore_eos` (not `min_tokens`).
source "$(dirname "$0")/common.sh"

LLAMA_CPP_PYTHON_VERSION=0.3.36
SRC_DIR="$PEERS_DIR/llama.cpp"
BIN="$SRC_DIR/build/bin/llama-server"

install() {
    if [[ -x "$BIN" ]]; then echo "$BIN"; return; fi
    local tmp
    tmp="$(mktemp -d)"
    # Only this package as an sdist; its build tools come as wheels.
    "$TOKENLOOM_PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        -d "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$SRC_DIR"
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$SRC_DIR"
    rm -rf "$tmp"
    # The web UI is fetched from the network at configure time; offline it fails,
    # and a benchmark has no use for it. OpenSSL is off for the same reason.
    cmake -S "$SRC_DIR" -B "$SRC_DIR/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build "$SRC_DIR/build" --target llama-server -j "$THREADS"
    echo "$BIN"
}

serve() {
    local port="$1"
    [[ -x "$BIN" ]] || install >&2
    exec "$BIN" -m "$(model_path)" --host "$HOST" --port "$port" \
        -t "$THREADS" -c "${LLAMA_CTX:-16384}" --parallel "${LLAMA_SLOTS:-32}" \
        --alias "$MODEL_ALIAS" --no-webui
}

perplexity() {
    local file="$1" n_ctx="${2:-512}" tool="$SRC_DIR/build/bin/llama-perplexity"
    [[ -x "$BIN" ]] || install >&2
    [[ -x "$tool" ]] || cmake --build "$SRC_DIR/build" --target llama-perplexity -j "$THREADS" >&2
    "$tool" -m "${MODEL_FILE:-$(model_path)}" -f "$file" -c "$n_ctx" -t "$THREADS" 2>&1 \
        | grep -E "^\[|estimated PPL|Final estimate"
}

quantize() {
    local tool="$SRC_DIR/build/bin/llama-quantize"
    [[ -x "$BIN" ]] || install >&2
    [[ -x "$tool" ]] || cmake --build "$SRC_DIR/build" --target llama-quantize -j "$THREADS" >&2
    "$tool" --allow-requantize "$1" "$2" "$3" "$THREADS"
}

convert() {
    [[ -x "$BIN" ]] || install >&2
    (cd "$SRC_DIR" && "$TOKENLOOM_PYTHON" convert_hf_to_gguf.py "$1" --outfile "$2" --outtype "$3" 2>&1 | tr "\r" "\n" \
        | grep -v "^Writing" | tail -3)
}

case "${1:-}" in
    install) install ;;
    perplexity) [[ $# -ge 2 ]] || usage_and_exit; perplexity "$2" "${3:-}" ;;
    quantize) [[ $# -eq 4 ]] || usage_and_exit; quantize "$2" "$3" "$4" ;;
    convert) [[ $# -eq 4 ]] || usage_and_exit; convert "$2" "$3" "$4" ;;
    serve) [[ $# -eq 2 ]] || usage_and_exit; serve "$2" ;;
    *) usage_and_exit ;;
esac
