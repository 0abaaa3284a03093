"""RMS normalization (Llama / Qwen2 / Mistral flavour)."""

from __future__ import annotations

import torch
from torch import nn

from tokenloom import kernels


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` over the last dimension.

    The statistic is taken in float32 and the normalized activations are cast
    back to the input dtype *before* the weight multiply, which is what the
    reference implementations do; bf16 results then match them bit for bit.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    fused_kernels = False  # True: the native single-pass kernel (float32 on CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernels:
            return kernels.ops().rms_norm(x, self.weight, self.eps)
        return self._reference(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a residual add and the norm after it."""
        if self.fused_kernels:
            return kernels.ops().add_rms_norm(x, residual, self.weight, self.eps)
        total = residual + x
        return self._reference(total), total

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        normed = (x32 * torch.rsqrt(variance + self.eps)).to(input_dtype)
        return self.weight * normed
