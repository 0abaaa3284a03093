"""GGUF tensor data -> torch tensor in the model dtype, on the model device.

The block formats the default models use (Q8_0, Q4_0, Q4_1) are expanded with
torch ops on the target device, so only the compact bytes travel and no numpy
float32 copy is made. Every other type goes through gguf's numpy reference
dequantizer. Block layouts (32 weights per block, little endian)::

    Q8_0  | d: f16 | 32 x int8 q |               w = d * q
    Q4_0  | d: f16 | 16 bytes    |               w = d * (nibble - 8)
    Q4_1  | d: f16 | m: f16 | 16 bytes |         w = d * nibble + m

Byte j of a 4-bit block holds weight j in its low nibble and weight j + 16 in
its high nibble.

For the quantized modes a quantized matrix also gives the blocks the native
kernels run on: Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K as they are
(``quantized_blocks``), every other quantized type (Q5_0/Q5_1, Q2_K/Q3_K/Q5_K,
IQ*) requantized to int8 blocks of 32 (``requantized_blocks``). Q4_K and Q6_K matrices are also
expanded from those blocks with torch ops.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import gguf
import numpy as np
import torch

from tokenloom.model.layers.quantization import QuantizedWeight, quantize

QType = gguf.GGMLQuantizationType
_FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)


def dequantize_tensor(data: np.ndarray, qtype: QType, shape: tuple[int, ...],
                      dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``data`` as ``GGUFTensor.data`` holds it -> tensor of ``shape`` (torch order, rows first)."""
    if qtype in (QType.F32, QType.F16):
        return _from_numpy(data).to(device=device, dtype=dtype).reshape(shape)
    if qtype == QType.BF16:
        raw = _from_numpy(data.view(np.int16)).to(device)
        return raw.view(torch.bfloat16).to(dtype).reshape(shape)
    if qtype in _K_QUANTS and len(shape) == 2:
        return quantized_blocks(data, qtype, shape).dequantize().to(device=device, dtype=dtype)
    kernel = _TORCH_KERNELS.get(qtype)
    if kernel is not None:
        type_size = gguf.GGML_QUANT_SIZES[qtype][1]
        blocks = _from_numpy(data).to(device).view(-1, type_size)  # [num_blocks, type_size] uint8
        return kernel(blocks).to(dtype).reshape(shape)
    try:
        values = gguf.quants.dequantize(data, qtype)
    except NotImplementedError:
        raise ValueError(f"GGUF tensor type {qtype.name} is not supported") from None
    return torch.from_numpy(values).to(device=device, dtype=dtype).reshape(shape)


def quantized_blocks(data: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> QuantizedWeight | None:
    """A Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K matrix as a ``QuantizedWeight`` holding
    exactly the file's weights and scales; None for other types."""
    if len(shape) != 2:
        return None
    if qtype in _K_QUANTS:
        return _K_QUANTS[qtype](_from_numpy(data).view(-1, gguf.GGML_QUANT_SIZES[qtype][1]), *shape)
    if qtype not in _TORCH_KERNELS:
        return None
    n, k = shape
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = _from_numpy(data).view(-1, type_size)  # [n * k / 32, type_size] uint8
    scales = _raw_f16(blocks, 0).view(n, k // 32)
    if qtype == QType.Q8_0:
        return QuantizedWeight("int8", blocks[:, 2:].contiguous().view(torch.int8).view(n, k), scales, None)
    if qtype == QType.Q4_0:  # d * (q - 8) == d * q + (-8 * d), exactly
        return QuantizedWeight("int4", blocks[:, 2:].reshape(n, k // 2).contiguous(), scales, -8 * scales)
    mins = _raw_f16(blocks, 2).view(n, k // 32)
    return QuantizedWeight("int4", blocks[:, 4:].reshape(n, k // 2).contiguous(), scales, mins)


def requantized_blocks(qtype: QType, shape: tuple[int, ...], dense: torch.Tensor) -> QuantizedWeight | None:
    """The int8 blocks a quantized matrix the kernels do not take as stored (Q5_0/Q5_1,
    Q2_K/Q3_K/Q5_K, IQ*) runs on: its values (``dense``, already dequantized)
    requantized to int8 blocks of 32. At 5 bits or more that adds an error of under
    half an int8 step (max|w| / 254 per block), a quarter of a 6-bit step; None for
    float matrices (they stay dense) and the types ``quantized_blocks`` takes."""
    if qtype in _FLOAT_TYPES or qtype in _K_QUANTS or qtype in _TORCH_KERNELS or len(shape) != 2 or shape[1] % 32:
        return None
    return quantize(dense.float(), "int8")


def _q4_k_blocks(blocks: torch.Tensor, n: int, k: int) -> QuantizedWeight:
    """Q4_K super-blocks as ``q4_k`` weights. A super-block of 256 weights::

        | d: f16 | dmin: f16 | 12 bytes: 8 x (6-bit scale, 6-bit min) | 128 bytes: 4 bits each |
        block j (32 weights): w = d * scale_j * nibble - dmin * min_j

    The nibbles move to the int4 layout (blocks 2c and 2c + 1 sit in the low and
    high nibbles of the same 32 bytes in Q4_K); every value is kept.
    """
    scale, min_ = _k4_scales_mins(blocks[:, 4:16])  # [num_super, 8]
    qs = blocks[:, 16:144].reshape(-1, 4, 1, 32)
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)  # [num_super, block, weight]
    packed = nibbles[..., :16] | (nibbles[..., 16:] << 4)  # byte j: weights j and j + 16
    return QuantizedWeight("q4_k", packed.reshape(n, k // 2).contiguous(), scale.reshape(n, k // 32),
                           min_.reshape(n, k // 32), _raw_f16(blocks, 0).reshape(n, k // 256),
                           _raw_f16(blocks, 2).reshape(n, k // 256))


def _k4_scales_mins(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's 12-byte packing of 8 six-bit (scale, min) pairs: blocks 0-3 in the
    low 6 bits of bytes 0-3 / 4-7; blocks 4-7 in bytes 8-11 (low / high nibble)
    with their top 2 bits in the top bits of bytes 0-3 / 4-7. uint8 [num_super, 8] each."""
    scale = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    min_ = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return scale.contiguous(), min_.contiguous()


def _q6_k_blocks(blocks: torch.Tensor, n: int, k: int) -> QuantizedWeight:
    """Q6_K super-blocks as ``q6_k`` weights. A super-block of 256 weights::

        | ql: 128 bytes, low 4 bits | qh: 64 bytes, top 2 bits | 16 x int8 scale | d: f16 |
        weights 16s .. 16s + 15: w = d * scale_s * (q - 32), q in 0..63

    Each half (128 weights) packs weight 32i + l (i < 4, l < 32) in the low or high
    nibble (i >= 2) of ql byte l + 32 (i % 2), and its top bits in bits 2i of qh byte l.
    """
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # [num_super, half, i % 2, l]
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # [num_super, half, 1, l]
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [num_super, half, i, l]
    top = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    q = (low | (top << 4)).reshape(n, k)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).reshape(n, k // 16)
    return QuantizedWeight("q6_k", q.contiguous(), scales, None, _raw_f16(blocks, 208).reshape(n, k // 256))


_K_QUANTS: dict[QType, Callable[[torch.Tensor, int, int], QuantizedWeight]] = {
    QType.Q4_K: _q4_k_blocks,
    QType.Q6_K: _q6_k_blocks,
}


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # GGUF tensors are read-only memory maps; they are only ever read from
    # here, so torch's warning about non-writable arrays does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _raw_f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 stored at byte ``start`` of every block, [num_blocks, 1] float16."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 stored at byte ``start`` of every block, as float32 [num_blocks, 1]."""
    return _raw_f16(blocks, start).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 16] uint8 -> [num_blocks, 32] float32, low nibbles first."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # [num_blocks, 32]
    return q * _f16(blocks, 0)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)


_TORCH_KERNELS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.Q8_0: _dequant_q8_0,
    QType.Q4_0: _dequant_q4_0,
    QType.Q4_1: _dequant_q4_1,
}
