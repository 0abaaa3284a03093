"""Rotary position embedding in the "rotate_half" layout.

Each head vector is split into halves ``[x1 | x2]`` and frequency i rotates the
pair ``(x1[i], x2[i])`` (the HF layout; llama.cpp's GGUF export interleaves the
pairs instead, and the GGUF loader undoes that permutation of q/k rows)::

    out = [x1 * cos - x2 * sin | x2 * cos + x1 * sin]

cos/sin are computed once for every position up to ``max_position`` and then
only indexed by ``positions``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenloom.config import RopeScaling


def compute_inv_freq(head_dim: int, rope_theta: float, scaling: RopeScaling,
                     freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in float32.

    ``freq_factors`` are per-frequency divisors as stored in a GGUF
    ``rope_freqs.weight`` tensor (llama.cpp's encoding of llama3 scaling).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif scaling.kind != "none":
        raise ValueError(f"unsupported rope scaling {scaling.kind!r} "
                         "(supported: none, linear, llama3)")
    if freq_factors is not None:
        if freq_factors.shape != inv_freq.shape:
            raise ValueError(f"rope_freqs has shape {tuple(freq_factors.shape)}, "
                             f"expected {tuple(inv_freq.shape)}")
        inv_freq = inv_freq / freq_factors.float().cpu()
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1: slow frequencies are divided by ``factor``, fast ones kept,
    and the band between them interpolated smoothly."""
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((old_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RopeInputs:
    """One step's rotary inputs, shared by every layer: ``positions`` and the cache for
    the fused kernels, and ``cos_sin()`` for the PyTorch path, gathered on first use
    (once per step; backends with a fused rotary never gather it)."""

    __slots__ = ("positions", "cos_sin_cache", "_cos_sin")

    def __init__(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
        self.positions = positions  # [num_tokens] int64
        self.cos_sin_cache = cos_sin_cache  # [max_position, head_dim]
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[num_tokens, 1, head_dim // 2]``, broadcastable over heads."""
        if self._cos_sin is None:
            self._cos_sin = gather_cos_sin(self.cos_sin_cache, self.positions)
        return self._cos_sin


def gather_cos_sin(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin_cache.index_select(0, positions)  # [num_tokens, head_dim]
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
    return cos, sin


class RotaryEmbedding(nn.Module):
    """Holds ``cos_sin_cache`` ``[max_position, head_dim]`` = ``[cos | sin]``
    in the model dtype (rounded once, like the reference implementations)."""

    cos_sin_cache: torch.Tensor

    def __init__(self, head_dim: int, max_position: int, rope_theta: float, scaling: RopeScaling,
                 dtype: torch.dtype, device: torch.device | str,
                 freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, rope_theta, scaling, freq_factors)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, head_dim // 2]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype=dtype, device=device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def inputs(self, positions: torch.Tensor) -> RopeInputs:
        return RopeInputs(positions, self.cos_sin_cache)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[num_tokens, 1, head_dim // 2]``, broadcastable over heads."""
        return gather_cos_sin(self.cos_sin_cache, positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim] -> same shape, rotated."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
