"""Paged attention for any mix of prefill chunks and decodes, in one launch.

The batch is flat (``model/layers/attention.py``): sequence s owns query rows
``query_start_loc[s]:query_start_loc[s+1]`` and has ``seq_lens[s]`` tokens of
context once this step's K/V are written. Its keys are read in place through
its block table, one cache block per tile.

Work split. A program takes one KV head and a *query block*: up to
``BLOCK_Q`` consecutive tokens of one sequence times that head's ``G`` query
heads (GQA: the K/V tile is loaded once for all of them)::

    tile rows (BLOCK_M = BLOCK_Q * G_PAD):   token 0: heads 0..G-1 | token 1: heads 0..G-1 | ...

Sequence s's query blocks are numbered from ``query_start_loc[s] // BLOCK_Q + s``
on, so the grid needs only ``num_tokens // BLOCK_Q + num_seqs`` blocks, and a
program finds its sequence by a binary search over ``query_start_loc``: the
grid depends on token and sequence counts, never on a value in device memory.

Segments and split-KV. Keys are cut at fixed positions into segments of
``SEGMENT`` tokens. Within a segment the softmax runs online; segments are
then merged left to right with one formula. A long context at small batch
runs each segment in its own program (flash-decoding) and a second kernel
merges their partial results in the same order with the same formula, so a
row's result is bit for bit the same whether or not the step split its keys,
and whatever else is in the batch: keys past a row's position add exact zeros.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SEGMENT = 256  # keys per segment; a multiple of every block size the kernel takes
# Triton reads TRITON_INTERPRET when a kernel is defined, so it is fixed by import time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks include ``q_block`` (the last s with
    query_start_loc[s] // BLOCK_Q + s <= q_block)."""
    lo = num_seqs * 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _merge(m, l, acc, seg_m, seg_l, seg_acc):
    """Fold one segment's (max, sum, unnormalised output) into the running one."""
    new_m = tl.maximum(m, seg_m)
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    alpha = tl.exp(m - safe_m)
    beta = tl.exp(seg_m - safe_m)
    return new_m, l * alpha + seg_l * beta, acc * alpha[:, None] + seg_acc * beta[:, None]


@triton.jit
def _attend_segment(q, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, q_pos, row_ok, scale,
                    seg_start, kv_end, dims, dim_ok,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, D_PAD: tl.constexpr,
                    SEGMENT: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of the query tile over keys [seg_start, min(seg_start + SEGMENT, kv_end))."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    offs = tl.arange(0, BLOCK_SIZE)
    seg_end = tl.minimum(seg_start + SEGMENT, kv_end)
    for start in range(seg_start, seg_end, BLOCK_SIZE):
        block = tl.load(block_table_ptr + start // BLOCK_SIZE).to(tl.int64)
        kv_pos = start + offs  # [BLOCK_SIZE]
        kv_ok = (kv_pos < seg_end)[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh
                    + dims[None, :], mask=kv_ok, other=0.0)  # [BLOCK_SIZE, D_PAD]
        v = tl.load(v_cache_ptr + block * stride_vb + offs[:, None] * stride_vs + kv_head * stride_vh
                    + dims[None, :], mask=kv_ok, other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_SIZE]
        visible = (kv_pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        new_m = tl.maximum(m, tl.max(s, 1))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        p = tl.exp(s - safe_m[:, None])  # [BLOCK_M, BLOCK_SIZE]; 0 where hidden
        alpha = tl.exp(m - safe_m)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = new_m
    return m, l, acc


# num_seqs is never specialised: a launch with one sequence would make it a constant,
# and the binary search's bounds must stay tensors.
@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
        part_m_ptr, part_l_ptr, part_acc_ptr, scale, num_seqs,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        stride_pt, stride_ph, stride_ps,
        G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, SEGMENT: tl.constexpr,
        SPLIT: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_token = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_token < q_len:
        context = tl.load(seq_lens_ptr + seq) - q_len  # tokens cached before this step
        rows = tl.arange(0, BLOCK_M)
        token = first_token + rows // G_PAD  # within the sequence's new tokens
        head = kv_head * G + rows % G_PAD
        row_ok = (token < q_len) & (rows % G_PAD < G)
        q_pos = context + token
        dims = tl.arange(0, D_PAD)
        dim_ok = dims < HEAD_DIM
        q_rows = (q_start + token).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
        if WIDEN:
            q = q.to(tl.float32)
        kv_end = context + tl.minimum(first_token + BLOCK_Q, q_len)  # keys the tile can see
        block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        if SPLIT:
            seg_start = tl.program_id(2) * SEGMENT
            m, l, acc = _attend_segment(q, k_cache_ptr, v_cache_ptr, block_table, kv_head, q_pos, row_ok, scale,
                                        seg_start, kv_end, dims, dim_ok, stride_kb, stride_ks, stride_kh,
                                        stride_vb, stride_vs, stride_vh, BLOCK_M, BLOCK_SIZE, D_PAD, SEGMENT,
                                        WIDEN, PRECISION)
            part = q_rows * stride_pt + head.to(tl.int64) * stride_ph + tl.program_id(2) * stride_ps
            tl.store(part_m_ptr + part, m, mask=row_ok)
            tl.store(part_l_ptr + part, l, mask=row_ok)
            tl.store(part_acc_ptr + part[:, None] * D_PAD + dims[None, :], acc, mask=row_ok[:, None])
        else:
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            for seg_start in range(0, kv_end, SEGMENT):
                seg_m, seg_l, seg_acc = _attend_segment(
                    q, k_cache_ptr, v_cache_ptr, block_table, kv_head, q_pos, row_ok, scale, seg_start, kv_end,
                    dims, dim_ok, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_M,
                    BLOCK_SIZE, D_PAD, SEGMENT, WIDEN, PRECISION)
                m, l, acc = _merge(m, l, acc, seg_m, seg_l, seg_acc)
            out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
            tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["num_segments"])
def _merge_segments_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, num_heads, num_segments,
                           stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SEGMENT: tl.constexpr):
    """One (token, head) row: fold its segments' partials left to right, as the
    unsplit kernel does, and normalise (a segment past the row's keys holds -inf, 0, 0)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, D_PAD)
    row = token * stride_pt + head * stride_ph
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, D_PAD], tl.float32)
    for s in range(0, num_segments):
        part = row + s * stride_ps
        seg_m = tl.load(part_m_ptr + part + tl.zeros([1], tl.int64))
        seg_l = tl.load(part_l_ptr + part + tl.zeros([1], tl.int64))
        seg_acc = tl.load(part_acc_ptr + part * D_PAD + dims[None, :])
        m, l, acc = _merge(m, l, acc, seg_m, seg_l, seg_acc)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(dims < HEAD_DIM)[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, *,
                    max_query_len: int, max_seq_len: int, split: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """q [num_tokens, H, D] -> [num_tokens, H, D] (the layout of ``model/layers/attention.py``).

    ``query_start_loc`` [num_seqs + 1] and ``seq_lens`` [num_seqs] are device
    tensors; ``max_query_len`` and ``max_seq_len`` are the host's own numbers
    (from the scheduler) and only size the launch: an upper bound gives the same
    bits (a CUDA graph's launch is sized for max_model_len; segments past a row's
    keys merge as (-inf, 0, 0)), and a row of seq_lens 0 (padding) comes out 0.
    ``split``: one program per segment of keys plus a merge pass (flash-decoding),
    for long contexts at small batch; the result is the same bits either way.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, width = k_cache.shape
    if width != head_dim or block_size < 16 or SEGMENT % block_size:
        raise ValueError(f"paged_attention: cache rows of {width} for head_dim {head_dim}, block size "
                         f"{block_size} (needs 16..{SEGMENT}, a power of two)")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_q = max(1, _block_rows(max_query_len) // group_pad)
    num_seqs = seq_lens.shape[0]
    num_q_blocks = num_tokens // block_q + num_seqs
    out = torch.empty_like(q) if out is None else out
    widen = _INTERPRETED
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    num_segments = triton.cdiv(max_seq_len, SEGMENT)
    split = split and num_segments > 1
    if split:
        # Every (valid row, segment) is written: a segment past a row's keys as (-inf, 0, 0).
        part_m = torch.empty((num_tokens, num_heads, num_segments), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((num_tokens, num_heads, num_segments, d_pad), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    strides_p = part_m.stride() if split else (0, 0, 0)
    grid = (num_q_blocks, num_kv_heads, num_segments if split else 1)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, part_m, part_l, part_acc,
        scale, num_seqs, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0), *strides_p,
        G=group, G_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        BLOCK_M=block_q * group_pad,
        SEGMENT=SEGMENT, SPLIT=split, WIDEN=widen, PRECISION=precision)
    if split:
        _merge_segments_kernel[(num_tokens, num_heads)](
            out, part_m, part_l, part_acc, num_heads, num_segments, out.stride(0), out.stride(1), *strides_p,
            HEAD_DIM=head_dim, D_PAD=d_pad, SEGMENT=SEGMENT)
    return out


def _block_rows(max_query_len: int) -> int:
    """Tile rows: 16 for decodes (the smallest tl.dot), 64 when prompt chunks make the tile worth filling."""
    return 16 if max_query_len <= 4 else 64
