"""Weight-only quantized copies of linear weights, for small batches.

Decoding a few sequences is bound by reading the weights: every step reads
all of them for a handful of rows. A ``QuantizedWeight`` holds a weight in
blocks of 32 along the input dimension, in llama.cpp's Q4_1 / Q8_0 layouts
with float16 block scales (see ``tokenloom/kernels/csrc/quant_linear.cpp``)::

    int4: qweight [N, K/2] uint8, scales [N, K/32], mins [N, K/32]   w = s * nibble + m
    int8: qweight [N, K] int8,    scales [N, K/32]                   w = s * q

A GGUF Q4_0 / Q4_1 / Q8_0 tensor maps onto these exactly (``quantized_blocks``
in the loader), so running a GGUF's 4-bit weights as int4 computes with the
file's own weights. Other weights are quantized here (``quantize``):
round-to-nearest per block against the float16-rounded scale (and min), int4
asymmetric (min/max), int8 symmetric (absmax), as llama.cpp's quantizers do.

Only the decode-sized matmuls use the quantized copy: large batches (prefill)
are compute bound, and the dense f32 GEMM is faster there on this class of
CPU. Batches of up to ``MAX_INT8_ACTIVATION_ROWS`` rows (single-stream
decode) also quantize the activations to int8 per block of 32, as llama.cpp
does for every matmul: their dot products then run on integer instructions,
which is what makes a lone stream fast on AVX2. Other batches keep f32
activations. A request's numbers therefore depend a little on how many others
share its step (no batch invariance, as in vLLM); ``--quantization none`` is
the exact path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom import kernels

BLOCK = 32
QUANTIZATION_KINDS = ("int4", "int8")
# Batches of at most this many rows use the quantized kernels; larger ones the
# dense GEMM (measured crossover on a 2-core AVX2 EPYC: see docs/performance.md).
MAX_QUANTIZED_ROWS = 32
MAX_INT8_ACTIVATION_ROWS = 4  # the i8 ops take any number of rows; past ~4 the f32 kernels win


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One [N, K] weight in blocks of 32 along K; ``mins`` is None for int8."""

    kind: str  # "int4" | "int8"
    qweight: torch.Tensor
    scales: torch.Tensor  # [N, K // 32] float16
    mins: torch.Tensor | None  # [N, K // 32] float16
    # False keeps f32 activations at every batch size: the LM head's, whose
    # errors land on the logits directly (near-ties between the top tokens flip).
    int8_activations: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * BLOCK

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> x @ W.T [M, N]; at most ``MAX_INT8_ACTIVATION_ROWS``
        rows run with x quantized to int8 per block of 32 (see module docstring)."""
        ops = kernels.ops()
        x = x.contiguous()
        small = self.int8_activations and x.shape[0] <= MAX_INT8_ACTIVATION_ROWS
        if self.kind == "int4":
            op = ops.q4_linear_i8 if small else ops.q4_linear
            return op(x, self.qweight, self.scales, self.mins)
        return (ops.q8_linear_i8 if small else ops.q8_linear)(x, self.qweight, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The f32 weight these blocks stand for, [N, K]."""
        n, k = self.shape
        scales = self.scales.float()[..., None]
        if self.kind == "int8":
            q = self.qweight.float().view(n, k // BLOCK, BLOCK)
            return (q * scales).view(n, k)
        packed = self.qweight.view(n, k // BLOCK, BLOCK // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # [N, K/32, 32]
        return (q * scales + self.mins.float()[..., None]).view(n, k)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """Rows ``index`` of the weight (a permutation or subset), exactly."""
        mins = None if self.mins is None else self.mins[index].contiguous()
        return QuantizedWeight(self.kind, self.qweight[index].contiguous(),
                               self.scales[index].contiguous(), mins, self.int8_activations)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack same-kind weights along N (a fused q/k/v or gate/up projection)."""
    kind = parts[0].kind
    if any(p.kind != kind for p in parts):
        raise ValueError("cannot fuse weights quantized differently")
    mins = None if kind == "int8" else torch.cat([p.mins for p in parts])
    return QuantizedWeight(kind, torch.cat([p.qweight for p in parts]),
                           torch.cat([p.scales for p in parts]), mins)


def quantize(weight: torch.Tensor, kind: str) -> QuantizedWeight:
    """Round-to-nearest block quantization of a dense [N, K] weight (K % 32 == 0)."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"cannot quantize a weight with {k} input features (not a multiple of {BLOCK})")
    blocks = weight.detach().float().cpu().view(n, k // BLOCK, BLOCK)
    if kind == "int8":
        scales = (blocks.abs().amax(-1) / 127).half()
        q = (blocks / scales.float().clamp(min=1e-30)[..., None]).round().clamp(-127, 127)
        return QuantizedWeight("int8", q.to(torch.int8).view(n, k).contiguous(), scales.contiguous(), None)
    if kind == "int4":
        lo = blocks.amin(-1).half()
        scales = ((blocks.amax(-1) - lo.float()) / 15).half()
        q = ((blocks - lo.float()[..., None]) / scales.float().clamp(min=1e-30)[..., None]).round().clamp(0, 15)
        q = q.to(torch.uint8)
        packed = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)  # byte j: weights j, j + 16
        return QuantizedWeight("int4", packed.reshape(n, k // 2).contiguous(), scales.contiguous(),
                               lo.contiguous())
    raise ValueError(f"unknown quantization {kind!r} (expected one of {QUANTIZATION_KINDS})")
