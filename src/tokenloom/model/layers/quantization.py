"""Quantized copies of linear weights, and which kernel multiplies by them.

A ``QuantizedWeight`` holds a weight in blocks of 32 along the input
dimension, in one of four kinds (see ``QuantizedWeight`` and
``tokenloom/kernels/csrc/quant_linear.cpp``): int4 and int8, llama.cpp's Q4_1
/ Q8_0 layouts with float16 block scales, and q4_k and q6_k, its Q4_K and
Q6_K super-blocks of 256 weights (6-bit or int8 sub-scales under one float16
scale per super-block).

A GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K tensor maps onto one of these exactly
(``quantized_blocks`` in the loader), so the kernels compute with the file's
own weights; the other quantized types (Q5_0/Q5_1, Q2_K/Q3_K/Q5_K, IQ*) are
requantized to int8 (``requantized_blocks``). Other weights are quantized here (``quantize``):
round-to-nearest per block against the float16-rounded scale (and min), int4
asymmetric (min/max), int8 symmetric (absmax), as llama.cpp's quantizers do.

``matmul`` multiplies by a weight's GEMM tiles (``with_gemm_tiles``; the
loader builds them for every weight it quantizes, decoder projections and LM
head alike), at any number of rows: the rows are quantized to int8 per block
of 32, as llama.cpp does, and multiplied by the weights re-laid out in tiles
of 8 output columns, so that the products run on integer instructions with
no horizontal sums (``quant_gemm``: ``q4_gemm``, ``q8_gemm``, ``q4k_gemm``,
``q6k_gemm``). Each row's result is the same
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
SUPER_BLOCK = 256  # weights per K-quant super-block (8 blocks of 32)
QUANTIZATION_KINDS = ("int4", "int8")  # what ``quantize`` makes
# Every kind a weight can run as -> its format code in the native ``quant_gemm``
# (``QuantFormat``, kernels/csrc/ops.h).
FORMATS = {"int8": 0, "int4": 1, "q4_k": 2, "q6_k": 3}
_FOUR_BIT = ("int4", "q4_k")  # qweight holds two nibbles per byte


@dataclass(frozen=True, slots=True)
class GemmTiles:
    """A weight laid out for the native GEMMs, N padded to a multiple of 16 (zero columns).

    Each tensor is a tile layout ``[N/8, X, W]`` (below: tile of 8 columns, block
    or super-block x, W bytes or values) stored as tile pairs, ``[N/16, X, 2 W]``:
    tiles 2p and 2p + 1 side by side per x. The kernels take column tiles two at a
    time and each thread a run of pairs, so that every tensor is read as one
    forward stream; with the two tiles of a pair apart, a thread read two
    streams that jumped to a new place every K/32 blocks, and one row's GEMM
    (a decode step) reached 23-31 GB/s where one stream reaches 30-50
    (docs/performance.md, "Tile pairs"). ``by_tile`` gives the tile layout back::

        tiles  int4: [N/8, K/32, 128] uint8: per 8 columns and block, 4 groups
                 of 32 bytes; byte 4c + r of group p holds column c's weight 8p + r
                 (low nibble) and 8p + 4 + r (high nibble)
               q4_k: [N/8, K/32, 144] uint8: those 128 bytes, then the block's 8
                 sub-scales and 8 sub-mins (one stream for the kernel to read)
               int8: [N/8, K/32, 256] int8: byte 4c + r of group p is weight 4p + r
               q6_k: [N/8, K/32, 192] uint8: the low nibbles as int4, then the top
                 2 bits: byte 4c + r of half-block g (32 bytes each) holds those of
                 weights 16g + r, 16g + 4 + r, 16g + 8 + r, 16g + 12 + r in bits
                 4-5, 6-7, 0-1, 2-3
        scales int4, int8: [N/8, K/32, 8] float16; q6_k: [N/8, K/32, 2 x 8] int8
               (half-block major); q4_k: None (in the tiles)
        mins   int4: [N/8, K/32, 8] float16
        super_scales, super_mins  q4_k, q6_k: d and (q4_k) -dmin, [N/8, K/256, 8] float16
    """

    tiles: torch.Tensor
    scales: torch.Tensor | None
    mins: torch.Tensor | None = None
    super_scales: torch.Tensor | None = None
    super_mins: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor | None]:
        """The weight tensors of ``quant_gemm``, in its order."""
        return [self.tiles, self.scales, self.mins, self.super_scales, self.super_mins]

    @classmethod
    def in_pairs(cls, *by_tile: torch.Tensor | None) -> GemmTiles:
        """Tensors in the tile layout [N/8, X, W] (N/8 even), stored as tile pairs."""
        return cls(*(None if t is None else _paired(t) for t in by_tile))

    def by_tile(self) -> GemmTiles:
        """The same tensors in the tile layout [N/8, X, W] (copies)."""
        return GemmTiles(*(None if t is None else _unpaired(t) for t in self.tensors()))


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One [N, K] weight in blocks of 32 along K (super-blocks of 256 for K-quants)::

        int4  qweight [N, K/2] uint8 (byte j of a block: weights j, j + 16),
              scales, mins [N, K/32] float16                       w = s * nibble + m
        int8  qweight [N, K] int8, scales [N, K/32] float16        w = s * q
        q4_k  qweight as int4, scales, mins [N, K/32] uint8 (6-bit),
              super_scales d, super_mins dmin [N, K/256] float16   w = d * s * nibble - dmin * m
        q6_k  qweight [N, K] uint8 (0..63), scales [N, K/16] int8,
              super_scales d [N, K/256] float16                    w = d * s * (q - 32)

    q4_k and q6_k are llama.cpp's Q4_K and Q6_K, value for value.
    """

    kind: str  # a key of FORMATS
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    super_scales: torch.Tensor | None = None
    super_mins: torch.Tensor | None = None
    gemm: GemmTiles | None = None  # what ``matmul`` runs on (with_gemm_tiles)
    has_blocks: bool = True  # False: the tiles alone (without_blocks)

    @property
    def shape(self) -> tuple[int, int]:
        n, width = self.qweight.shape
        return n, width * 2 if self.kind in _FOUR_BIT else width

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> x @ W.T [M, N] on the GEMM tiles (int8 activations)."""
        if self.gemm is None:
            raise ValueError("this QuantizedWeight has no GEMM tiles: build them with with_gemm_tiles()")
        return kernels.ops().quant_gemm(x.contiguous(), FORMATS[self.kind], self.gemm.tensors(), self.shape[0])

    def _tensors(self) -> list[torch.Tensor | None]:
        return [self.qweight, self.scales, self.mins, self.super_scales, self.super_mins]

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight holds: the blocks and, when built, the GEMM tiles."""
        tensors = (self._tensors() if self.has_blocks else []) + (self.gemm.tensors() if self.gemm is not None else [])
        return [t for t in tensors if t is not None]

    def without_blocks(self) -> QuantizedWeight:
        """The GEMM tiles alone, all ``matmul`` reads: the blocks they were built from are
        dropped (they hold the same bytes again), so a loaded model holds its quantized
        weights once. The tiles are a permutation of the blocks, so ``dequantize`` and
        ``select_rows`` still work, on blocks rebuilt for the call (``restored``)."""
        if self.gemm is None:
            raise ValueError("without_blocks() would leave nothing to multiply by: build the GEMM tiles first")
        # Zero-stride stand-ins of one element keep each tensor's shape (``shape`` reads it).
        stubs = [None if t is None else t.new_zeros(()).expand(t.shape) for t in self._tensors()]
        return QuantizedWeight(self.kind, *stubs, gemm=self.gemm, has_blocks=False)

    def restored(self) -> QuantizedWeight:
        """This weight with its blocks: rebuilt from the GEMM tiles, exactly, if they were dropped."""
        if self.has_blocks:
            return self
        n, k = self.shape
        nb, g = k // BLOCK, self.gemm.by_tile()
        num_tiles = g.tiles.shape[0]
        rows = lambda t: t.transpose(1, 2).reshape(num_tiles * 8, t.shape[1])[:n].contiguous()  # noqa: E731 (tiled undone)
        if self.kind == "int8":
            q = g.tiles.view(num_tiles, nb, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(num_tiles * 8, k)[:n]
            return QuantizedWeight("int8", q.contiguous(), rows(g.scales), None)
        nibbles = _untiled_nibbles(g.tiles[..., :128])[:n]  # [n, K/32, 32]: int4, q4_k; q6_k's low bits
        if self.kind == "int4":
            return QuantizedWeight("int4", _packed_nibbles(nibbles), rows(g.scales), rows(g.mins))
        if self.kind == "q4_k":
            return QuantizedWeight("q4_k", _packed_nibbles(nibbles), rows(g.tiles[..., 128:136]),
                                   rows(g.tiles[..., 136:144]), rows(g.super_scales), rows(-g.super_mins))
        high = g.tiles[..., 128:].reshape(num_tiles, nb, 2, 8, 4).permute(0, 3, 1, 2, 4)  # [tile, column, block, g, r]
        shifts = torch.tensor([[4, 6], [0, 2]], dtype=torch.uint8).view(2, 2, 1)
        top = (high[..., None, None, :] >> shifts) & 3  # [tile, column, block, g, pp, h, r]
        q = nibbles | (top.reshape(num_tiles * 8, nb, BLOCK)[:n] << 4)
        scales = g.scales.view(num_tiles, nb, 2, 8).permute(0, 3, 1, 2).reshape(num_tiles * 8, nb * 2)[:n]
        return QuantizedWeight("q6_k", q.reshape(n, k).contiguous(), scales.contiguous(), None,
                               rows(g.super_scales))

    @property
    def nbytes(self) -> int:
        """Memory held: the blocks and, when built, the GEMM tiles."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())

    def with_gemm_tiles(self) -> QuantizedWeight:
        """This weight with its ``GemmTiles`` too."""
        if self.gemm is not None:
            return self
        n, k = self.shape
        nb, num_tiles = k // BLOCK, 2 * -(-n // 16)
        pad = num_tiles * 8 - n  # zero columns: weight 0, scale 0, min 0
        padded = lambda t: torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t  # noqa: E731
        # A view: _paired makes the one copy.
        tiled = lambda t: padded(t).view(num_tiles, 8, t.shape[1]).transpose(1, 2)  # noqa: E731
        if self.kind == "int8":
            q = padded(self.qweight).view(num_tiles, 8, nb, 8, 4)  # [tile, column, block, group, r]: k = 4 group + r
            tiles = q.permute(0, 2, 3, 1, 4).contiguous().view(num_tiles, nb, 256)
            return dataclasses.replace(self, gemm=GemmTiles.in_pairs(tiles, tiled(self.scales)))
        if self.kind == "int4":
            tiles = _nibble_tiles(padded(self._nibbles()), num_tiles)
            return dataclasses.replace(self, gemm=GemmTiles.in_pairs(tiles, tiled(self.scales), tiled(self.mins)))
        if self.kind == "q4_k":  # each block's sub-scales and sub-mins follow its nibbles
            blocks = [_nibble_tiles(padded(self._nibbles()), num_tiles), tiled(self.scales), tiled(self.mins)]
            return dataclasses.replace(self, gemm=GemmTiles.in_pairs(torch.cat(blocks, dim=-1), None, None,
                                                                     tiled(self.super_scales),
                                                                     tiled(-self.super_mins)))
        q = padded(self.qweight).view(-1, nb, BLOCK)
        # [tile, column, block, half-block g, pair pp, half h, r]: weight 16g + 8pp + 4h + r;
        # its top bits at bits 4, 6, 0, 2 for (pp, h) = (0, 0), (0, 1), (1, 0), (1, 1)
        top = (q >> 4).view(num_tiles, 8, nb, 2, 2, 2, 4)
        shifts = torch.tensor([[4, 6], [0, 2]], dtype=torch.uint8).view(2, 2, 1)
        high = (top << shifts).sum(dim=(4, 5), dtype=torch.uint8)  # [tile, column, block, g, r]
        high = high.permute(0, 2, 3, 1, 4).reshape(num_tiles, nb, 64)
        tiles = torch.cat([_nibble_tiles(q & 0x0F, num_tiles), high], dim=-1)
        scales = padded(self.scales).view(num_tiles, 8, nb, 2).permute(0, 2, 3, 1).reshape(num_tiles, nb, 16)
        return dataclasses.replace(self, gemm=GemmTiles.in_pairs(tiles, scales, None, tiled(self.super_scales)))

    def _nibbles(self) -> torch.Tensor:
        n, k = self.shape
        packed = self.qweight.view(n, k // BLOCK, BLOCK // 2)
        return torch.cat([packed & 0x0F, packed >> 4], dim=-1)  # [N, K/32, 32] in weight order

    def dequantize(self) -> torch.Tensor:
        """The f32 weight these blocks stand for, [N, K]."""
        if not self.has_blocks:
            return self.restored().dequantize()
        n, k = self.shape
        if self.kind == "int8":
            return (self.qweight.float().view(n, k // BLOCK, BLOCK) * self.scales.float()[..., None]).view(n, k)
        if self.kind == "int4":
            return (self._nibbles().float() * self.scales.float()[..., None] + self.mins.float()[..., None]).view(n, k)
        per_block = k // self.scales.shape[1]  # weights per sub-scale: 32 (q4_k) or 16 (q6_k)
        d = self.super_scales.float().repeat_interleave(SUPER_BLOCK // per_block, dim=1)
        if self.kind == "q4_k":  # as llama.cpp: (d * sc) * q - (dmin * m)
            dmin = self.super_mins.float().repeat_interleave(SUPER_BLOCK // per_block, dim=1)
            return ((d * self.scales.float())[..., None] * self._nibbles().float()
                    - (dmin * self.mins.float())[..., None]).view(n, k)
        q = self.qweight.float().view(n, k // per_block, per_block) - 32
        return ((d * self.scales.float())[..., None] * q).view(n, k)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """Rows ``index`` of the weight (a permutation or subset), exactly; without
        GEMM tiles (``with_gemm_tiles`` builds them for the result)."""
        rows = [None if t is None else t[index].contiguous() for t in self.restored()._tensors()]
        return QuantizedWeight(self.kind, *rows)


@dataclass(frozen=True, slots=True)
class StackedWeight:
    """A merged projection whose parts are quantized in different kinds (Q4_K_M's
    q/k in Q4_K and, in half its layers, v in Q6_K): one GEMM per run of parts of
    one kind, the outputs side by side, so that every part keeps the file's blocks."""

    parts: tuple[QuantizedWeight, ...]

    @property
    def kind(self) -> str:
        return "+".join(p.kind for p in self.parts)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def gemm(self) -> tuple[GemmTiles, ...] | None:
        return None if any(p.gemm is None for p in self.parts) else tuple(p.gemm for p in self.parts)

    def held_tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.held_tensors()]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.matmul(x) for p in self.parts], dim=1)

    def with_gemm_tiles(self) -> StackedWeight:
        return StackedWeight(tuple(p.with_gemm_tiles() for p in self.parts))

    def without_blocks(self) -> StackedWeight:
        return StackedWeight(tuple(p.without_blocks() for p in self.parts))

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | StackedWeight:
    """Parts of one merged projection along N, in order: one weight where they share a
    kind (``concat_rows``), else a ``StackedWeight`` of the runs of one kind."""
    runs: list[list[QuantizedWeight]] = []
    for part in parts:
        if runs and runs[-1][0].kind == part.kind:
            runs[-1].append(part)
        else:
            runs.append([part])
    stacked = [run[0] if len(run) == 1 else concat_rows(run) for run in runs]
    return stacked[0] if len(stacked) == 1 else StackedWeight(tuple(stacked))


def _paired(t: torch.Tensor) -> torch.Tensor:
    """[2P, X, W] in the tile layout -> [P, X, 2 W]: tiles 2p and 2p + 1 side by side per x."""
    tiles, x, w = t.shape
    return t.reshape(tiles // 2, 2, x, w).transpose(1, 2).reshape(tiles // 2, x, 2 * w).contiguous()


def _unpaired(t: torch.Tensor) -> torch.Tensor:
    """``_paired`` undone."""
    pairs, x, w2 = t.shape
    return t.reshape(pairs, x, 2, w2 // 2).transpose(1, 2).reshape(2 * pairs, x, w2 // 2)


def _nibble_tiles(nibbles: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """[8 num_tiles, K/32, 32] values below 16 -> the int4 tile bytes [num_tiles, K/32, 128]."""
    nb = nibbles.shape[1]
    q = nibbles.view(num_tiles, 8, nb, 4, 2, 4)  # [tile, column, block, group, half, r]: k = 8 group + 4 half + r
    packed = q[..., 0, :] | (q[..., 1, :] << 4)  # [tile, column, block, group, r]
    return packed.permute(0, 2, 3, 1, 4).contiguous().view(num_tiles, nb, 128)


def _untiled_nibbles(tiles: torch.Tensor) -> torch.Tensor:
    """``_nibble_tiles`` undone: [num_tiles, K/32, 128] tile bytes -> [8 num_tiles, K/32, 32] values."""
    num_tiles, nb = tiles.shape[:2]
    packed = tiles.reshape(num_tiles, nb, 4, 8, 4).permute(0, 3, 1, 2, 4)  # [tile, column, block, group, r]
    return torch.stack([packed & 0x0F, packed >> 4], dim=-2).reshape(num_tiles * 8, nb, BLOCK)


def _packed_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """[N, K/32, 32] values below 16 -> the int4 blocks' bytes [N, K/2] (byte j: weights j, j + 16)."""
    n, nb, _ = nibbles.shape
    return (nibbles[..., :BLOCK // 2] | (nibbles[..., BLOCK // 2:] << 4)).reshape(n, nb * BLOCK // 2).contiguous()


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack same-kind weights along N (a fused q/k/v or gate/up projection);
    without GEMM tiles, as ``select_rows``."""
    kind = parts[0].kind
    if any(p.kind != kind for p in parts):
        raise ValueError("cannot fuse weights quantized differently")
    columns = zip(*(p.restored()._tensors() for p in parts))
    return QuantizedWeight(kind, *(None if c[0] is None else torch.cat(c) for c in columns))


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
