"""Quantized copies of linear weights, and which kernel multiplies by them.

A ``QuantizedWeight`` holds a weight in blocks of 32 along the input
dimension, in llama.cpp's Q4_1 / Q8_0 layouts with float16 block scales (see
``tokenloom/kernels/csrc/quant_linear.cpp``)::

    int4: qweight [N, K/2] uint8, scales [N, K/32], mins [N, K/32]   w = s * nibble + m
    int8: qweight [N, K] int8,    scales [N, K/32]                   w = s * q

A GGUF Q4_0 / Q4_1 / Q8_0 tensor maps onto these exactly (``quantized_blocks``
in the loader), so running a GGUF's 4-bit weights as int4 computes with the
file's own weights; a Q4_K one too, up to the f16 rounding of its block scales;
the other K-quants and Q5 types are requantized to int8 (``file_blocks``).
Other weights are quantized here (``quantize``):
round-to-nearest per block against the float16-rounded scale (and min), int4
asymmetric (min/max), int8 symmetric (absmax), as llama.cpp's quantizers do.

``matmul`` multiplies by a weight's GEMM tiles (``with_gemm_tiles``; the
loader builds them for every weight it quantizes, decoder projections and LM
head alike), at any number of rows: the rows are quantized to int8 per block
of 32, as llama.cpp does, and multiplied by the weights re-laid out in tiles
of 8 output columns, so that the products run on integer instructions with
no horizontal sums (``q4_gemm``, ``q8_gemm``). Each row's result is the same
whatever else is in the batch (batch-invariant). Per-row kernels (f32 or
int8 activations) came before the tiles; the tiles measured faster at every
batch size (1.1-1.6x at one row, ~2.8x at 32), so they went. Int8 activations on
the Q8_0 LM head move the default model's perplexity by less than 0.01%
(docs/performance.md), as llama.cpp, which does the same, also finds.
``--quantization none`` is the exact path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokenloom import kernels

BLOCK = 32
QUANTIZATION_KINDS = ("int4", "int8")


@dataclass(frozen=True, slots=True)
class GemmTiles:
    """An int4 weight laid out for ``q4_gemm``, N padded to a multiple of 8::

        tiles  [N/8, K/32, 128] uint8: per 8 columns and block, 4 groups of 32 bytes;
               byte 4c + r of group p holds column c's weight 8p + r (low nibble)
               and 8p + 4 + r (high nibble)
        scales, mins [N/8, K/32, 8] float16
    """

    tiles: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None  # int4 only


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One [N, K] weight in blocks of 32 along K; ``mins`` is None for int8."""

    kind: str  # "int4" | "int8"
    qweight: torch.Tensor
    scales: torch.Tensor  # [N, K // 32] float16
    mins: torch.Tensor | None  # [N, K // 32] float16
    gemm: GemmTiles | None = None  # what ``matmul`` runs on (with_gemm_tiles)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * BLOCK

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> x @ W.T [M, N] on the GEMM tiles (int8 activations)."""
        if self.gemm is None:
            raise ValueError("this QuantizedWeight has no GEMM tiles: build them with with_gemm_tiles()")
        ops = kernels.ops()
        x = x.contiguous()
        if self.kind == "int8":
            return ops.q8_gemm(x, self.gemm.tiles, self.gemm.scales, self.shape[0])
        return ops.q4_gemm(x, self.gemm.tiles, self.gemm.scales, self.gemm.mins, self.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held: the blocks and, when built, the GEMM tiles."""
        tensors = [self.qweight, self.scales, self.mins]
        if self.gemm is not None:
            tensors += [self.gemm.tiles, self.gemm.scales, self.gemm.mins]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def with_gemm_tiles(self) -> QuantizedWeight:
        """This weight with its ``GemmTiles`` too."""
        n, k = self.shape
        nb, num_tiles = k // BLOCK, -(-n // 8)
        pad = num_tiles * 8 - n  # zero columns: weight 0, scale 0, min 0
        padded = lambda t: torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t  # noqa: E731
        by_tile = lambda t: padded(t).view(num_tiles, 8, nb).transpose(1, 2).contiguous()  # noqa: E731
        if self.kind == "int8":
            q = padded(self.qweight).view(num_tiles, 8, nb, 8, 4)  # [tile, column, block, group, r]: k = 4 group + r
            tiles = q.permute(0, 2, 3, 1, 4).contiguous().view(num_tiles, nb, 256)
            return dataclasses.replace(self, gemm=GemmTiles(tiles, by_tile(self.scales), None))
        q = padded(self._nibbles()).view(num_tiles, 8, nb, 4, 2, 4)  # [tile, column, block, group, half, r]: k = 8 group + 4 half + r
        packed = q[..., 0, :] | (q[..., 1, :] << 4)  # [tile, column, block, group, r]
        tiles = packed.permute(0, 2, 3, 1, 4).contiguous().view(num_tiles, nb, 128)
        return dataclasses.replace(self, gemm=GemmTiles(tiles, by_tile(self.scales), by_tile(self.mins)))

    def _nibbles(self) -> torch.Tensor:
        n, k = self.shape
        packed = self.qweight.view(n, k // BLOCK, BLOCK // 2)
        return torch.cat([packed & 0x0F, packed >> 4], dim=-1)  # [N, K/32, 32] in weight order

    def dequantize(self) -> torch.Tensor:
        """The f32 weight these blocks stand for, [N, K]."""
        n, k = self.shape
        scales = self.scales.float()[..., None]
        if self.kind == "int8":
            q = self.qweight.float().view(n, k // BLOCK, BLOCK)
            return (q * scales).view(n, k)
        q = self._nibbles().float()  # [N, K/32, 32]
        return (q * scales + self.mins.float()[..., None]).view(n, k)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """Rows ``index`` of the weight (a permutation or subset), exactly; without
        GEMM tiles (``with_gemm_tiles`` builds them for the result)."""
        mins = None if self.mins is None else self.mins[index].contiguous()
        return QuantizedWeight(self.kind, self.qweight[index].contiguous(), self.scales[index].contiguous(), mins)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack same-kind weights along N (a fused q/k/v or gate/up projection);
    without GEMM tiles, as ``select_rows``."""
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
