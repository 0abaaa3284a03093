"""RMS normalization (Llama / Qwen2 / Mistral flavour)."""

from __future__ import annotations

import torch
from torch import nn

from tokenloom.model.layers.backend import TorchOps


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` over the last dimension, through the model's
    backend (``backend.py``; the reference is ``TorchOps.rms_norm``)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.ops = TorchOps()  # replaced by LlamaForCausalLM.use_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a residual add and the norm after it."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
