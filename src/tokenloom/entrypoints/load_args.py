"""The flags that say how a model is loaded and where it runs (vLLM's names), shared by
``tokenloom serve|chat`` and ``tokenloom bench throughput``."""

from __future__ import annotations

import argparse
from typing import Any

from tokenloom.config import DTYPE_CHOICES, LOAD_FORMATS, QUANTIZATION_MODES
from tokenloom.model_files import shape_names


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype of the model; auto: bfloat16 on CUDA, float32 on the CPU "
                   "(default: %(default)s)")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATION_MODES,
                   help="weight format of the linear layers for decode: auto runs a GGUF's own "
                   "Q4_0/Q4_1/Q8_0 blocks as they are and keeps float weights dense (on CUDA: dense "
                   "everywhere); none is dense float everywhere; int8/int4 quantize every projection "
                   "(CPU only) (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="torch device, e.g. cpu or cuda; auto: cuda when torch sees a GPU, else cpu "
                   "(default: %(default)s)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto: the model's weights; dummy: random weights in the model's shape, which "
                   "may then also be a config.json or a shipped shape "
                   f"({', '.join(shape_names()) or 'in a source checkout'}) (default: %(default)s)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory for the weights, one step's activations and the KV cache, "
                   "which gets what the other two leave; CUDA only, --kv-cache-memory wins "
                   "(default: %(default)s)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of ``add_load_args`` as ``build_engine_config`` / ``LLM(...)`` options."""
    return dict(dtype=args.dtype, quantization=args.quantization, device=args.device,
                load_format=args.load_format, gpu_memory_utilization=args.gpu_memory_utilization)
