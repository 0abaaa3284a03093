# Shared settings for the peer scripts; sourced, never run.
#
# Peers live in their own virtualenvs under a cache dir outside the repo tree,
# so that no peer code is vendored here and a peer's dependencies can never
# leak into tokenloom's .venv.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOKENLOOM_PYTHON="${TOKENLOOM_PYTHON:-$REPO_ROOT/.venv/bin/python}"
PEERS_DIR="${TOKENLOOM_PEERS_DIR:-${TOKENLOOM_HOME:-$HOME/.cache/tokenloom}/peers}"
HOST="${PEER_HOST:-127.0.0.1}"
THREADS="${PEER_THREADS:-$(nproc)}"
MODEL_ALIAS="${PEER_MODEL:-smollm2-135m}"

mkdir -p "$PEERS_DIR"

# The GGUF every server loads: the same file tokenloom serves.
model_path() {
    "$TOKENLOOM_PYTHON" -c \
        "from tokenloom.model_files import resolve_model; print(resolve_model('$MODEL_ALIAS'))"
}

# A peer's own virtualenv; created once.
peer_venv() {
    local dir="$PEERS_DIR/$1-venv"
    if [[ ! -x "$dir/bin/python" ]]; then
        "$TOKENLOOM_PYTHON" -m venv "$dir" >&2
        "$dir/bin/pip" install --quiet --upgrade pip >&2
    fi
    echo "$dir"
}

usage_and_exit() {
    echo "usage: $0 install | serve PORT" >&2
    exit 2
}
