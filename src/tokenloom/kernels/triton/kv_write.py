"""Scatter one step's keys/values into the paged KV cache (CUDA).

Same contract as ``write_kv`` in ``model/layers/attention.py`` (the cast and
``index_copy_`` into the flat ``[num_blocks * block_size, KVH, D]`` view), plus
vLLM's padding convention: a slot < 0 writes nothing, so a padded batch (a CUDA
graph captured for more tokens than were scheduled) can pass -1 for its tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)


@triton.jit
def _store_row(src_ptr, src_stride, cache_ptr, cache_stride, scale, mask, cols,
               IS_FP8: tl.constexpr):
    """Load one head's row of k or v, widen, (fp8: scale) and store it cast to the cache dtype."""
    x = tl.load(src_ptr + cols * src_stride, mask=mask, other=0.0).to(tl.float32)
    if IS_FP8:
        x = x / scale
    tl.store(cache_ptr + cols * cache_stride, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(k_ptr, k_s0, k_s1, k_s2, v_ptr, v_s0, v_s1, v_s2,
                     kc_ptr, kc_s0, kc_s1, kc_s2, kc_s3, vc_ptr, vc_s0, vc_s1, vc_s2, vc_s3,
                     slot_ptr, block_size, head_dim, k_scale, v_scale,
                     BLOCK: tl.constexpr, IS_FP8: tl.constexpr):
    # One program per (token, kv head); both caches in one pass.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * row size overflows int32 in big caches
    # Padding (slot < 0) masks every column; block/offset are then never dereferenced.
    # (One comparison rather than `& (slot >= 0)`: the interpreter mistypes that mask.)
    block = slot // block_size
    offset = slot % block_size
    cols = tl.arange(0, BLOCK)
    mask = cols < tl.where(slot >= 0, head_dim, 0)
    _store_row(k_ptr + token * k_s0 + head * k_s1, k_s2,
               kc_ptr + block * kc_s0 + offset * kc_s1 + head * kc_s2, kc_s3,
               k_scale, mask, cols, IS_FP8)
    _store_row(v_ptr + token * v_s0 + head * v_s1, v_s2,
               vc_ptr + block * vc_s0 + offset * vc_s1 + head * vc_s2, vc_s3,
               v_scale, mask, cols, IS_FP8)


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError("write_kv: caches must both be [num_blocks, block_size, num_kv_heads, head_dim] "
                         f"of one dtype, got {k_cache.dtype} {tuple(k_cache.shape)} and "
                         f"{v_cache.dtype} {tuple(v_cache.shape)}")
    if k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"write_kv: cache dtype {k_cache.dtype} not supported (supported: {CACHE_DTYPES})")
    rows = (k.shape[0], k_cache.shape[2], k_cache.shape[3])
    if k.shape != rows or v.shape != rows:
        raise ValueError(f"write_kv: k and v must be {rows}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"write_kv: slot_mapping must be int64 [{k.shape[0]}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if k_cache.dtype != torch.float8_e4m3fn and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError("write_kv: k_scale/v_scale apply to float8 caches only")


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write k, v [n, KVH, D] (any strides) into k_cache, v_cache
    [num_blocks, block_size, KVH, D] at flat slots ``slot_mapping`` [n]
    (block_id * block_size + offset), cast to the cache dtype; a slot < 0 is skipped.

    float8_e4m3fn caches store ``value / scale`` (per-tensor scales). Slots are
    not bounds-checked (that would read them back to the host).
    """
    _check(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
    n, num_kv_heads, head_dim = k.shape
    if n == 0:
        return
    block = triton.next_power_of_2(head_dim)
    _write_kv_kernel[(n, num_kv_heads)](
        k, *k.stride(), v, *v.stride(), k_cache, *k_cache.stride(), v_cache, *v_cache.stride(),
        slot_mapping, k_cache.shape[1], head_dim, k_scale, v_scale,
        BLOCK=block, IS_FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=1 if block <= 128 else 2)
