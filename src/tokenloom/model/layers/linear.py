"""Dense projections, including fused ones that run as a single matmul.

A fused projection stacks its parts along the output dimension::

    qkv_proj.weight   [q_size + k_size + v_size, hidden]   rows: | q | k | v |
    gate_up_proj.weight [2 * intermediate, hidden]         rows: | gate | up |

Checkpoints store the parts separately; the loader copies each one into the
rows that ``shard_rows`` names. A projection may also carry a quantized copy
of its weight (``quantized``, see ``quantization.py``), which then takes every
batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.model.layers.quantization import QuantizedWeight, StackedWeight


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 quantized: QuantizedWeight | StackedWeight | None) -> torch.Tensor:
    """x [M, K] -> [M, N]: the quantized kernels if there is a quantized copy, else the dense GEMM."""
    if quantized is not None:
        y = quantized.matmul(x)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)`` with weight ``[output_size, input_size]``.

    Parameters are allocated uninitialized: every value comes from a checkpoint.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(output_size, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.quantized: QuantizedWeight | StackedWeight | None = None  # set after loading, if at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias, self.quantized)

    def release_dense_weight(self) -> None:
        """Free the dense weight once ``quantized`` (with its GEMM tiles) takes
        every batch; ``weight`` becomes an empty [output_size, 0] tensor."""
        if self.quantized is None or self.quantized.gemm is None:
            raise ValueError("the dense weight is still needed: there is no quantized copy with GEMM tiles")
        self.weight = nn.Parameter(self.weight.new_empty(self.output_size, 0), requires_grad=False)


class MergedLinear(Linear):
    """Several projections of the same input fused into one ``Linear``.

    ``output_sizes`` names the parts in row order, e.g. ``{"q": 512, "k": 128, "v": 128}``.
    ``forward`` returns the fused output; callers split it with ``split_sizes``.
    """

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(input_size, sum(output_sizes.values()), bias, dtype, device)
        self.output_sizes = dict(output_sizes)
        self.split_sizes = list(output_sizes.values())

    def shard_rows(self, shard: str) -> slice:
        """Rows of ``weight`` (and entries of ``bias``) that hold part ``shard``."""
        start = 0
        for name, size in self.output_sizes.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(f"{shard!r} is not a part of this projection "
                       f"(parts: {', '.join(self.output_sizes)})")
