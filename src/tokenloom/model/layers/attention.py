"""Attention over the paged KV cache (plain PyTorch, any device).

Cache layout, one pair per layer::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, width]

    slot = block_id * block_size + offset      (flat index into the first two dims)

    block_table of a sequence:  [b7, b2, b9]   -> tokens 0..15 in b7, 16..31 in b2, ...

``width`` is head_dim for a float cache (float32, float16, bfloat16). An int8
cache quantizes every (token, kv head) row by itself, symmetric, as llama.cpp's
``q8_0`` KV cache does per block: ``s = max|x| / 127``, ``q = round(x / s)``,
and the row holds the head_dim int8 values then ``s`` as float32 (4 bytes), so
``width`` = head_dim + 4 and a row needs nothing outside itself (the C++
kernels read the same layout: kernels/csrc/cache_rows.h). An fp8 cache
(float8 e4m3) holds each value cast, with no scale.

A step's batch is flat: the new tokens of every sequence back to back. Sequence
i owns rows ``query_start_loc[i]:query_start_loc[i+1]`` and, after this step,
has ``seq_lens[i]`` tokens of context in the cache. A sequence's new tokens
attend causally to each other and fully to everything computed before them,
so prefill chunks, decodes and recomputation after preemption are one case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenloom import kernels


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Runner -> model, passed explicitly to every attention layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int64, rows padded with block 0
    seq_lens: torch.Tensor  # [num_seqs] int64: context length after this step
    query_start_loc: tuple[int, ...]  # len num_seqs + 1, host ints
    # seq_lens as host ints; in a CUDA graph's static batch a bound on each (runner/cuda_graph.py)
    seq_lens_host: tuple[int, ...]
    block_size: int
    # query_start_loc on the device (int64), for kernels that find their rows there
    query_start_loc_tensor: torch.Tensor | None = None
    # Derived once here, not in each of the layers that read them.
    max_query_len: int = field(init=False)
    max_seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        starts = self.query_start_loc
        object.__setattr__(self, "max_query_len", max((b - a for a, b in zip(starts, starts[1:])), default=0))
        object.__setattr__(self, "max_seq_len", max(self.seq_lens_host, default=0))

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence feeds exactly one new token (the common serving step)."""
        return self.query_start_loc[-1] == self.num_seqs


NATIVE_CACHE_DTYPES = (torch.float32, torch.float16, torch.int8)  # what the C++ kernels read
# An fp8 cache holds each value cast to float8 e4m3 (scale 1, as vLLM's fp8 cache without
# calibration): half a 16-bit cache's bytes; the Triton kernels read and write it.
FP8_CACHE_DTYPES = (torch.float8_e4m3fn,)
_INT8_SCALE_BYTES = 4  # a float32 after each int8 row


def kv_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one (token, kv head) cache row: the last dim of a cache of ``dtype``."""
    return head_dim + _INT8_SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] float -> [..., head_dim + 4] int8 cache rows (values, then the
    float32 scale). The same float32 arithmetic as the C++ ``write_kv``, so both
    write the same bytes."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = (x * inv).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def cache_rows_as(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., width] as values [..., head_dim] of ``dtype`` (int8 rows dequantized)."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    values, scale = rows[..., :-_INT8_SCALE_BYTES], rows[..., -_INT8_SCALE_BYTES:].contiguous()
    return (values.float() * scale.view(torch.float32)).to(dtype)


def to_cache_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values [..., head_dim] as rows of a cache of ``dtype`` (int8: quantized)."""
    return quantize_kv(x) if dtype == torch.int8 else x.to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, native: bool = False) -> None:
    """Scatter this step's keys/values ([num_tokens, num_kv_heads, head_dim]) into their slots.

    ``native``: one C++ call for both caches (float32 rows into a float32,
    float16 or int8 CPU cache), the same bits as the cast (or ``quantize_kv``)
    and ``index_copy_`` below.

    A slot < 0 is padding (a batch padded to a static size, runner/cuda_graph.py)
    and writes nothing. Here that is checked on the CPU only: on CUDA the check
    would wait for the device, and padded CUDA steps use the Triton write.
    """
    if native and k.dtype == torch.float32 and k_cache.dtype in NATIVE_CACHE_DTYPES:
        kernels.ops().write_kv(k_cache, v_cache, k, v, slot_mapping)
        return
    if slot_mapping.device.type == "cpu" and slot_mapping.numel() and slot_mapping.min() < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for cache, x in ((k_cache, k), (v_cache, v)):
        rows = to_cache_rows(x, cache.dtype)
        if cache.dtype in FP8_CACHE_DTYPES:  # index_copy_ has no float8 kernels: copy the bytes
            cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, rows)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, native: bool = False) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].

    The new tokens' K/V must already be written to the cache (``write_kv``).
    ``native``: the C++ kernel, which reads K/V through the block tables in
    place (float32, float16 or int8 CPU caches, head_dim a multiple of 8), one
    kernel for every step, batch-invariant (kernels/csrc/paged_attention.cpp).
    """
    if native and q.shape[-1] % 8 == 0 and k_cache.dtype in NATIVE_CACHE_DTYPES:
        return kernels.ops().paged_attention(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                             query_start_loc(meta), scale)
    if meta.is_decode_only:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    starts = meta.query_start_loc
    for i, seq_len in enumerate(meta.seq_lens_host):
        lo, hi = starts[i], starts[i + 1]
        k, v = _gather_context(k_cache, v_cache, meta.block_tables[i], seq_len)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, causal_offset=seq_len - (hi - lo))
    return out


def query_start_loc(meta: AttentionMetadata) -> torch.Tensor:
    starts = meta.query_start_loc_tensor
    return torch.tensor(meta.query_start_loc) if starts is None or starts.dtype != torch.int64 else starts


def _gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cached K/V: [seq_len, num_kv_heads, head_dim] each."""
    num_blocks = -(-seq_len // k_cache.shape[1])
    blocks = block_table[:num_blocks]
    k = k_cache[blocks].flatten(0, 1)[:seq_len]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            causal_offset: int) -> torch.Tensor:
    """q: [q_len, H, D]; k, v: [kv_len, KVH, width] cache rows; query j sits at position
    causal_offset + j."""
    q_len, kv_len = q.shape[0], k.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    kh = cache_rows_as(k, q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, kv_len, D]
    vh = cache_rows_as(v, q.dtype).transpose(0, 1).unsqueeze(0)
    mask = None
    # A whole prompt at once is plain causal attention, which SDPA does without a
    # mask and, on the CPU, skips the blocks above the diagonal (half the work).
    is_causal = q_len > 1 and causal_offset == 0
    if q_len > 1 and not is_causal:
        rows = torch.arange(q_len, device=q.device).unsqueeze(1) + causal_offset
        mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= rows  # [q_len, kv_len]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=kh.shape[1] != qh.shape[1])
    return out.squeeze(0).transpose(0, 1)  # [q_len, H, D]


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences decode one token: one padded batched attention call.

    Padding keys are masked out and their K/V zeroed first (the cache holds
    anything where nobody wrote: it is not initialised), so they add exact
    zeros and a sequence's result does not depend on what else is in the batch.
    A padding row (seq_lens 0, runner/cuda_graph.py) sees one zeroed key and
    gives 0: a row that sees nothing is NaN on some SDPA backends.
    """
    block_size = k_cache.shape[1]
    max_len = meta.max_seq_len
    num_blocks = -(-max_len // block_size)
    tables = meta.block_tables[:, :num_blocks]  # [S, nb]
    k = cache_rows_as(k_cache[tables].flatten(1, 2)[:, :max_len], q.dtype)  # [S, max_len, KVH, D]
    v = cache_rows_as(v_cache[tables].flatten(1, 2)[:, :max_len], q.dtype)
    keys = torch.arange(max_len, device=q.device).unsqueeze(0)  # [1, max_len]
    padding = ~(keys < meta.seq_lens.unsqueeze(1))[:, :, None, None]
    k, v = k.masked_fill(padding, 0), v.masked_fill(padding, 0)
    mask = keys < meta.seq_lens.clamp(min=1).unsqueeze(1)  # [S, max_len]
    qh = q.unsqueeze(2)  # [S, H, 1, D]
    kh = k.transpose(1, 2)  # [S, KVH, max_len, D]
    vh = v.transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=kh.shape[1] != qh.shape[1])
    return out.squeeze(2)  # [S, H, D]
