"""Fused per-layer elementwise ops for CUDA: RMSNorm (with the residual add
before it), rotary embedding of q and k out of the fused projection, and the
gated SiLU of the MLP.

Same contracts as the PyTorch references in ``model/layers`` and the C++ twins
in ``kernels/csrc/fused_ops.cpp``; any float dtype (float32, float16, bfloat16).
Every tile is widened to float32 right after loading and narrowed only at the
store (the interpreter keeps bf16 as raw 16-bit words, and one rounding is
also what the hardware path wants).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_ELEMENTWISE_BLOCK = 1024  # silu_and_mul tiles columns: a row of 14336 would spill registers


def _num_warps(block: int) -> int:
    # ~8 elements a thread for wide rows, never below one warp or above eight.
    return min(max(block // 256, 1), 8)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be a [rows, cols] matrix with unit column stride, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"{name}: weight must be contiguous {x.dtype} [{x.shape[1]}], "
                         f"got {weight.dtype} {tuple(weight.shape)}")


# ---------------------------------------------------------------- RMSNorm


@triton.jit
def _normalize(x, w, mask, width, eps, out_dtype: tl.constexpr):
    """x, w: fp32 [BLOCK] -> w * (x / rms(x)) in fp32, with the normalized value
    rounded to ``out_dtype`` before the weight multiply (what the reference does)."""
    x = tl.where(mask, x, 0.0)
    variance = tl.sum(x * x, axis=0) / width
    normed = (x * tl.rsqrt(variance + eps)).to(out_dtype).to(tl.float32)
    return w * normed


@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, w_ptr, out_ptr, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    y = _normalize(x, w, mask, width, eps, out_dtype)
    tl.store(out_ptr + row * width + cols, y.to(out_dtype), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, x_stride, r_ptr, r_stride, w_ptr, out_ptr, total_ptr, width, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    # The sum is a tensor of the input dtype in the reference: round it before the statistic.
    total = (r + x).to(out_dtype)
    tl.store(total_ptr + row * width + cols, total, mask=mask)
    y = _normalize(total.to(tl.float32), w, mask, width, eps, out_dtype)
    tl.store(out_ptr + row * width + cols, y.to(out_dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [n, hidden] (rows may be strided), weight [hidden] -> weight * x / rms(x) [n, hidden]."""
    _check_rows(x, "rms_norm: x")
    _check_weight(weight, x, "rms_norm")
    n, width = x.shape
    out = torch.empty((n, width), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(n,)](x, x.stride(0), weight, out, width, eps, BLOCK=block,
                           num_warps=_num_warps(block))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), both new [n, hidden] tensors."""
    _check_rows(x, "add_rms_norm: x")
    _check_rows(residual, "add_rms_norm: residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual is {residual.dtype} {tuple(residual.shape)}, "
                         f"x is {x.dtype} {tuple(x.shape)}")
    _check_weight(weight, x, "add_rms_norm")
    n, width = x.shape
    out = torch.empty((n, width), dtype=x.dtype, device=x.device)
    total = torch.empty_like(out)
    if n == 0:
        return out, total
    block = triton.next_power_of_2(width)
    _add_rms_norm_kernel[(n,)](x, x.stride(0), residual, residual.stride(0), weight, out, total,
                               width, eps, BLOCK=block, num_warps=_num_warps(block))
    return out, total


# ---------------------------------------------------------------- rotary


@triton.jit
def _rotary_qk_kernel(qkv_ptr, qkv_stride, cache_ptr, pos_ptr, q_ptr, k_ptr,
                      num_heads, num_kv_heads, head_dim, BLOCK: tl.constexpr):
    # One program per (token, head) over the H query heads then the KVH key heads;
    # the value heads behind them are not rotated and not read.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = head_dim // 2
    i = tl.arange(0, BLOCK)
    mask = i < half
    pos = tl.load(pos_ptr + token)
    cs_row = cache_ptr + pos * head_dim
    cos = tl.load(cs_row + i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + half + i, mask=mask, other=0.0).to(tl.float32)
    src = qkv_ptr + token * qkv_stride + head * head_dim
    x1 = tl.load(src + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + i, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    out_dtype = q_ptr.dtype.element_ty
    if head < num_heads:
        dst = q_ptr + (token * num_heads + head) * head_dim
    else:
        dst = k_ptr + (token * num_kv_heads + (head - num_heads)) * head_dim
    tl.store(dst + i, y1.to(out_dtype), mask=mask)
    tl.store(dst + half + i, y2.to(out_dtype), mask=mask)


def rotary_qk(qkv: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
              num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [n, (H + 2 KVH) * D] (rows may be strided, e.g. a view) -> rotated
    q [n, H, D] and k [n, KVH, D], new contiguous tensors of qkv's dtype.

    cos_sin_cache [max_position, D] = [cos | sin] (any float dtype, widened);
    positions [n] int64, any order. Positions are not bounds-checked (that would
    read them back to the host): the caller keeps them below max_position.
    """
    _check_rows(qkv, "rotary_qk: qkv")
    if head_dim % 2 != 0:
        raise ValueError(f"rotary_qk: head_dim must be even, got {head_dim}")
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"rotary_qk: qkv has {qkv.shape[1]} columns, expected "
                         f"{(num_heads + 2 * num_kv_heads) * head_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or not cos_sin_cache.is_contiguous():
        raise ValueError(f"rotary_qk: cos_sin_cache must be contiguous [max_position, {head_dim}], "
                         f"got {tuple(cos_sin_cache.shape)}")
    n = qkv.shape[0]
    if positions.shape != (n,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rotary_qk: positions must be int64 [{n}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    q = torch.empty((n, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((n, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if n == 0:
        return q, k
    block = triton.next_power_of_2(head_dim // 2)
    _rotary_qk_kernel[(n, num_heads + num_kv_heads)](
        qkv, qkv.stride(0), cos_sin_cache, positions, q, k, num_heads, num_kv_heads, head_dim,
        BLOCK=block, num_warps=_num_warps(block))
    return q, k


# ---------------------------------------------------------------- gated SiLU


@triton.jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    src = x_ptr + row * x_stride
    gate = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    # silu rounded to the input dtype before the multiply, as F.silu(gate) * up is:
    # the product of two 16-bit values is then exact in fp32 and rounds once, like PyTorch's.
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (silu * up).to(out_dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [n, 2 I] = [gate | up] (rows may be strided) -> silu(gate) * up [n, I]."""
    _check_rows(x, "silu_and_mul: x")
    if x.shape[1] % 2 != 0:
        raise ValueError(f"silu_and_mul: x must have an even number of columns, got {x.shape[1]}")
    n, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    if n == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), _MAX_ELEMENTWISE_BLOCK)
    grid = (n, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x, x.stride(0), out, inter, BLOCK=block, num_warps=_num_warps(block))
    return out
