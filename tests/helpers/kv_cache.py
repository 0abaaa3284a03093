"""Cache-side helpers shared by the attention kernel tests."""

from __future__ import annotations

import torch


def poison(cache: torch.Tensor, slots: torch.Tensor, value: float) -> None:
    """Make the rows of ``slots`` (a [num_blocks, block_size] mask) hold ``value``.
    An int8 row cannot hold NaN or inf: its values become 127 and its float32
    scale (the last 4 bytes, layers/attention.py) ``value``."""
    if cache.dtype != torch.int8:
        cache[slots] = value
        return
    rows = cache[slots]
    rows[..., :-4] = 127
    rows[..., -4:] = torch.tensor([value], dtype=torch.float32).view(torch.int8)
    cache[slots] = rows
