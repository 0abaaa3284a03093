#!/usr/bin/env bash
# Hugging Face `transformers serve --continuous-batching` (paged attention, PyTorch eager).
#
#   transformers_serve.sh install      venv under $PEERS_DIR + the GGUF exported to an HF dir
#   transformers_serve.sh serve PORT   run it in the foreground on 127.0.0.1:PORT
#
# `transformers serve` cannot load this GGUF as a local file, so install
# dequantizes it once (transformers' own GGUF reader) into an HF directory of
# float32 safetensors; served in float32 on the CPU, like tokenloom's default.
# Its /v1/models fails unless HF_HUB_CACHE names an existing dir (set below),
# and it refuses `ignore_eos`: bench it with --force-output none (or
# min_tokens if your version takes it); outputs then stop at EOS and the
# load generator counts the tokens that really came.
#
# The venv reuses torch from tokenloom's .venv (a .pth file) rather than
# installing a second torch: an unpinned torch from PyPI pulls gigabytes of CUDA.
source "$(dirname "$0")/common.sh"

TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
HF_DIR="$PEERS_DIR/transformers-hf/$MODEL_ALIAS"

install() {
    local venv site torch_site
    venv="$(peer_venv transformers)"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    torch_site="$("$TOKENLOOM_PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
    echo "$torch_site" > "$site/tokenloom-torch.pth"
    if ! "$venv/bin/python" -c "import sys, fastapi, uvicorn, transformers
sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
        "$venv/bin/pip" install --quiet "transformers[serving]==$TRANSFORMERS_VERSION" "torch==2.13.0" >&2
    fi
    if [[ ! -f "$HF_DIR/config.json" ]]; then
        "$venv/bin/python" - "$(model_path)" "$HF_DIR" >&2 <<'PY'
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
# A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its weights
# are already dequantized, so move them into a plain model of the same config.
config = loaded.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype="float32")
model.load_state_dict(loaded.state_dict())
model.generation_config = loaded.generation_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
PY
    fi
    echo "$venv"
}

serve() {
    local port="$1" venv
    venv="$(install)"
    mkdir -p "$PEERS_DIR/hf-hub-cache"
    export HF_HUB_CACHE="$PEERS_DIR/hf-hub-cache" HF_HUB_OFFLINE=1 OMP_NUM_THREADS="$THREADS"
    exec "$venv/bin/python" -c "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())" \
        serve "$HF_DIR" --continuous-batching --device cpu --dtype float32 \
        --host "$HOST" --port "$port" ${TRANSFORMERS_SERVE_ARGS:-}
}

case "${1:-}" in
    install) install ;;
    serve) [[ $# -eq 2 ]] || usage_and_exit; serve "$2" ;;
    *) usage_and_exit ;;
esac
