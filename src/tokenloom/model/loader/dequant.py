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

For ``--quantization auto`` a quantized matrix also gives the blocks the native
kernels run on (``file_blocks``): Q8_0 / Q4_0 / Q4_1 as they are, Q4_K
re-laid as int4 blocks of 32 (``_q4_k_blocks``), every other quantized type
(Q5_0/Q5_1, Q2_K/Q3_K/Q5_K/Q6_K, IQ*) requantized to int8 blocks of 32.
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
    """A Q4_0 / Q4_1 / Q8_0 matrix as a ``QuantizedWeight`` holding exactly the
    file's weights and f16 scales, a Q4_K one as the same int4 blocks of 32 (see
    ``_q4_k_blocks``); None for other types."""
    if len(shape) != 2:
        return None
    if qtype == QType.Q4_K:
        return _q4_k_blocks(_from_numpy(data).view(-1, gguf.GGML_QUANT_SIZES[qtype][1]), *shape)
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


def file_blocks(data: np.ndarray, qtype: QType, shape: tuple[int, ...], dense: torch.Tensor) -> QuantizedWeight | None:
    """The blocks a quantized GGUF matrix runs on: its own (``quantized_blocks``) where
    the kernels take them, else (Q5_0/Q5_1, Q2_K/Q3_K/Q5_K/Q6_K, IQ*) its values
    (``dense``, already dequantized) requantized to int8 blocks of 32. At 5 bits or
    more that adds an error of under half an int8 step (max|w| / 254 per block), a
    quarter of a 6-bit step; None for float matrices (they stay dense)."""
    blocks = quantized_blocks(data, qtype, shape)
    if blocks is not None or qtype in _FLOAT_TYPES or len(shape) != 2 or shape[1] % 32:
        return blocks
    return quantize(dense.float(), "int8")


def _q4_k_blocks(blocks: torch.Tensor, n: int, k: int) -> QuantizedWeight:
    """Q4_K super-blocks as int4 blocks of 32. A super-block of 256 weights::

        | d: f16 | dmin: f16 | 12 bytes: 8 x (6-bit scale, 6-bit min) | 128 bytes: 4 bits each |
        sub-block j (32 weights): w = d * scale_j * nibble - dmin * min_j

    is 8 int4 blocks with scale d * scale_j and min -dmin * min_j. Nibbles are
    moved to the int4 layout (sub-blocks 2c and 2c + 1 sit in the low and high
    nibbles of the same 32 bytes in Q4_K); the block scales are those products
    rounded to f16 (under 0.05% of a scale, a hundredth of a 4-bit step), so the
    weights are the file's, up to that rounding.
    """
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [num_super, 1]
    scale, min_ = _k4_scales_mins(blocks[:, 4:16].int())  # [num_super, 8]
    qs = blocks[:, 16:144].reshape(-1, 4, 1, 32)
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)  # [num_super, sub-block, weight]
    packed = nibbles[..., :16] | (nibbles[..., 16:] << 4)  # byte j: weights j and j + 16
    return QuantizedWeight("int4", packed.reshape(n, k // 2).contiguous(),
                           (d * scale).to(torch.float16).reshape(n, k // 32),
                           (-dmin * min_).to(torch.float16).reshape(n, k // 32))


def _k4_scales_mins(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's 12-byte packing of 8 six-bit (scale, min) pairs: sub-blocks 0-3 in the
    low 6 bits of bytes 0-3 / 4-7; sub-blocks 4-7 in bytes 8-11 (low / high nibble)
    with their top 2 bits in the top bits of bytes 0-3 / 4-7."""
    scale = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    min_ = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return scale.float(), min_.float()


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
