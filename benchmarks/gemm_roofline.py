"""Each quantized GEMM's speed, per weight format and instruction set, against MKL.

    PYTHONPATH=. .venv/bin/python benchmarks/gemm_roofline.py

Prefill-shaped: y[256, 2048] = x[256, 2048] @ W^T, GFLOP/s (compute-bound).
Decode-shaped: one row against 16 distinct [2048 x 8192] weights in turn (so
that they come from memory, not the cache), GB/s of weight bytes read.
Formats: int8 (Q8_0), int4 (Q4_0/Q4_1), q4_k (Q4_K), q6_k (Q6_K), on every
instruction set this CPU has (``kernels.gemm_isa``); MKL's f32 and oneDNN's
bf16 GEMM on the dense weight for reference. Best of several repeats; the
machine is shared, so compare within one run.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from benchmarks.roofline import best_seconds  # the repo root is on the path: run from it
from tests.helpers.tiny_models import random_kquant
from tokenloom import kernels
from tokenloom.model.layers.quantization import QuantizedWeight, StackedWeight, quantize
from tokenloom.model.loader.dequant import quantized_blocks

QType = gguf.GGMLQuantizationType
FORMATS = ("int8", "int4", "q4_k", "q6_k")


def weight(kind: str, n: int, k: int, seed: int) -> QuantizedWeight:
    if kind in ("int8", "int4"):
        return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02, kind)
    qtype = QType.Q4_K if kind == "q4_k" else QType.Q6_K
    return quantized_blocks(random_kquant(np.random.default_rng(seed), (n, k), qtype), qtype, (n, k))


def weight_bytes(w: QuantizedWeight | StackedWeight) -> int:
    """The bytes a GEMM reads: its tiles (every part's, for a stacked weight)."""
    return sum(t.numel() * t.element_size() for p in getattr(w, "parts", (w,)) for t in p.gemm.tensors()
               if t is not None)


def main() -> None:
    isas = ["avx2"] + (["avx512_vnni"] if kernels.gemm_isa("auto") == "avx512_vnni" else [])
    m, n, k = 256, 2048, 2048
    x = torch.randn(m, k)
    dense = torch.randn(n, k) * 0.02
    flops = 2 * m * n * k
    print(f"| path | {m} x {n} x {k} GFLOP/s | 1 row x [2048 -> 8192], GB/s of weights |")
    print("|---|---|---|")
    print(f"| MKL f32 (dense) | {flops / best_seconds(lambda: x @ dense.T) / 1e9:.0f} | |")
    xb, db = x.bfloat16(), dense.bfloat16()
    print(f"| oneDNN bf16 (dense) | {flops / best_seconds(lambda: xb @ db.T) / 1e9:.0f} | |")
    decode_x = torch.randn(1, 8192)
    for kind in FORMATS:
        prefill = weight(kind, n, k, 0).with_gemm_tiles()
        decode = [weight(kind, 2048, 8192, seed).with_gemm_tiles() for seed in range(16)]
        for isa in isas:
            kernels.gemm_isa(isa)
            gflops = flops / best_seconds(lambda: prefill.matmul(x)) / 1e9
            seconds = best_seconds(lambda: [w.matmul(decode_x) for w in decode]) / len(decode)
            print(f"| {kind} on {isa} | {gflops:.0f} | {weight_bytes(decode[0]) / seconds / 1e9:.1f} |")
    kernels.gemm_isa("auto")


if __name__ == "__main__":
    main()
