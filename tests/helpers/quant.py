"""Fake quantization: what the int8-activation kernels compute, in plain PyTorch."""

from __future__ import annotations

import torch


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x with every block of 32 rounded to int8 steps of max|block| / 127 (llama.cpp's Q8);
    an all-zero block stays zero."""
    blocks = x.reshape(x.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / step) * step).nan_to_num().view_as(x)

