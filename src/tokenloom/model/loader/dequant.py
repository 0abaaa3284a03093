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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import gguf
import numpy as np
import torch

from tokenloom.model.layers.quantization import QuantizedWeight

QType = gguf.GGMLQuantizationType


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
    file's weights and f16 scales; None for other types."""
    if qtype not in _TORCH_KERNELS or len(shape) != 2:
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
