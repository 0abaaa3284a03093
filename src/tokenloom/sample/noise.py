"""Counter-based random noise: one reproducible stream per sequence, no torch.Generator.

The noise for row i, vocab entry j at output position t is a pure function of
(seed_i, t, j), so a sequence draws the same tokens whatever else shares the
batch, whatever its row, and again after a preemption by recompute.

    row key   k_i  = mix(seed_hi ^ mix(seed_lo ^ mix(t ^ C)))      # [num_seqs]
    entry     h_ij = mix(k_i ^ vocab_hash[j])                       # [num_seqs, vocab]
    uniform   w_ij = (h_ij + 0.5) / 2**32          in (0, 1)
    noise     E_ij = -log1p(-w_ij)                 ~ Exp(1)

For a fixed seed, t -> k is a bijection (a chain of bijections), so two
positions of one sequence never share a stream. ``vocab_hash`` is a fixed
random-looking permutation of the 32-bit space, so that rows whose keys
differ in a few bits do not get shifted or permuted copies of each other.

All arithmetic is int64 masked to 32 bits. A multiplier c >= 2**31 is used as
c - 2**32 (same value mod 2**32), so |x * c| < 2**63 for x < 2**32: nothing
overflows, and the result is identical on every device.
"""

from __future__ import annotations

import functools

import torch

_MASK32 = 0xFFFFFFFF
# lowbias32 (Chris Wellons' hash prospector): a good 32-bit finaliser.
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # as a negative int64, see the module docstring
_POSITION_SALT = 0x9E3779B9
_VOCAB_SALT = 0x85EBCA6B
_UNIFORM_SALT = 0xC2B2AE35


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32); a bijection of that range."""
    x = x ^ (x >> 16)  # a new tensor: the rest works in place on it
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit stream key per (seed, output position). seeds, positions: [num_seqs] int64."""
    seed_lo = seeds & _MASK32
    seed_hi = (seeds >> 32) & _MASK32  # seeds are < 2**63, so this is non-negative
    key = mix32((positions & _MASK32) ^ _POSITION_SALT)
    key = mix32(seed_lo ^ key)
    return mix32(seed_hi ^ key)  # [num_seqs]


@functools.lru_cache(maxsize=8)
def _vocab_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return mix32(ids ^ _VOCAB_SALT)  # [vocab_size], distinct values


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One U(0, 1) float32 per row [num_seqs], a pure function of (seed, position), drawn
    from a stream apart from ``exponential_noise``'s (speculative decoding's acceptance test)."""
    h = mix32(row_keys(seeds, positions) ^ _UNIFORM_SALT)  # [num_seqs]
    return h.to(torch.float32).add_(0.5).mul_(2.0**-32)


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [num_seqs, vocab_size] float32, a pure function of (seed, position, token id).

    Values lie in (0, inf]; +inf (w rounding to 1 in float32) only makes that token lose that draw.
    """
    keys = row_keys(seeds, positions)  # [num_seqs]
    h = mix32(keys[:, None] ^ _vocab_hash(vocab_size, seeds.device)[None, :])  # [num_seqs, vocab]
    # Small w (large weight after division) keeps full float32 precision: that is where the race is won.
    w = h.to(torch.float32).add_(0.5).mul_(2.0**-32)
    return w.neg_().log1p_().neg_()
