"""Cache-side helpers shared by the attention kernel tests."""

from __future__ import annotations

import torch

from tokenloom.model.layers.attention import to_cache_rows


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


def q_and_cache_cases(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      ) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """(id, expected message, inputs to replace) for the q and cache checks both attention
    kernels share (csrc/attention_checks.h); q is float32, the caches k and v float32."""
    int8_k, int8_v = to_cache_rows(k, torch.int8), to_cache_rows(v, torch.int8)
    return [
        ("q dtype", "q must be float32", {"q": q.double()}),
        ("q dims", "q must be", {"q": q[0]}),
        ("q layout", "q must be contiguous", {"q": q.transpose(0, 1).contiguous().transpose(0, 1)}),
        ("k dtype", "k_cache must be float32, float16 or int8", {"k_cache": k.double()}),
        ("v dtype", "v_cache must be float32, float16 or int8", {"v_cache": v.bfloat16()}),
        ("k half, v float", "v_cache dtype Float must match k_cache dtype Half", {"k_cache": k.half()}),
        ("k float, v half", "v_cache dtype Half must match k_cache dtype Float", {"v_cache": v.half()}),
        ("k layout", "k_cache must be contiguous", {"k_cache": k.transpose(0, 1)}),
        ("v shape", "v_cache shape", {"v_cache": v[:-1]}),
        ("head_dim mismatch", "do not hold q's head_dim", {"q": q[:, :, :8].contiguous()}),
        ("int8 rows without scales", "do not hold q's head_dim",
         {"k_cache": int8_k[..., :-4].contiguous(), "v_cache": int8_v[..., :-4].contiguous()}),
        ("int8 rows, head_dim mismatch", "do not hold q's head_dim",
         {"q": q[:, :, :8].contiguous(), "k_cache": int8_k, "v_cache": int8_v}),
    ]
