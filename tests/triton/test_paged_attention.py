"""The Triton paged attention kernel against plain PyTorch attention, on the CPU
through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA) and on CUDA where there is one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenloom.kernels.triton.attention import SEGMENT, paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, k_cache, v_cache, tables, seq_lens, q_lens, scale):
    """Each sequence alone: its context gathered from the cache, causal over its new tokens."""
    outs, start = [], 0
    group = q.shape[1] // k_cache.shape[2]
    for table, seq_len, q_len in zip(tables, seq_lens, q_lens):
        k = k_cache[table].flatten(0, 1)[:seq_len].float()  # [seq_len, KVH, D]
        v = v_cache[table].flatten(0, 1)[:seq_len].float()
        qs = q[start:start + q_len].float()  # [q_len, H, D]
        pos = torch.arange(seq_len - q_len, seq_len)
        mask = torch.arange(seq_len)[None, :] <= pos[:, None]  # [q_len, seq_len]
        kh = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq_len, D]
        vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
        out = F.scaled_dot_product_attention(qs.transpose(0, 1), kh, vh, attn_mask=mask, scale=scale)
        outs.append(out.transpose(0, 1))
        start += q_len
    return torch.cat(outs)


def _case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and a cache whose unused slots hold NaN; block tables shuffled."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(perm[used:used + n])
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for table, n in zip(tables, seq_lens):
        flat = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        k_cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    width = max(blocks_per_seq)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return q, k_cache, v_cache, tables, padded, starts


def _run(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, split=False, atol=2e-5):
    q, k_cache, v_cache, tables, padded, starts = _case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim,
                                                       block_size, dtype)
    scale = head_dim ** -0.5
    expected = _reference(q, k_cache, v_cache, tables, seq_lens, q_lens, scale)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out = paged_attention(dev(q), dev(k_cache), dev(v_cache), dev(padded),
                          dev(torch.tensor(seq_lens, dtype=torch.int32)), dev(starts), scale,
                          max_query_len=max(q_lens), max_seq_len=max(seq_lens), split=split)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=atol)
    return out


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_prefill_and_decode(num_heads, num_kv_heads, block_size):
    # a fresh prompt, a chunk after a cached prefix, two decodes; lengths off block boundaries
    _run(seq_lens=[21, 50, 17, 33], q_lens=[21, 13, 1, 1], num_heads=num_heads, num_kv_heads=num_kv_heads,
         head_dim=32, block_size=block_size, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cache_dtypes_and_odd_head_dim(dtype):
    atol = 2e-5 if dtype == torch.float32 else 2e-3
    _run(seq_lens=[40, 5], q_lens=[7, 5], num_heads=4, num_kv_heads=1, head_dim=48, block_size=16,
         dtype=dtype, atol=atol)


@pytest.mark.parametrize("split", [False, True])
def test_long_context_split_kv(split):
    seq_lens = [SEGMENT * 2 + 37, SEGMENT + 1, 9]
    _run(seq_lens=seq_lens, q_lens=[1, 1, 1], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
         dtype=torch.float32, split=split)


def test_split_is_bit_identical_to_unsplit():
    args = dict(seq_lens=[SEGMENT * 2 + 5, SEGMENT + 40], q_lens=[1, 1], num_heads=3, num_kv_heads=1,
                head_dim=16, block_size=16, dtype=torch.float32)
    assert torch.equal(_run(**args, split=True), _run(**args, split=False))


def test_a_row_does_not_depend_on_the_batch():
    """A decode alone and beside a long prompt chunk (other tile rows, more key tiles): the same bits."""
    q, k_cache, v_cache, _, tables, starts = _case([70, 90], [1, 40], 4, 2, 32, 16, torch.float32)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    seq_lens = torch.tensor([70, 90], dtype=torch.int32)
    batched = paged_attention(dev(q), dev(k_cache), dev(v_cache), dev(tables), dev(seq_lens), dev(starts), 0.2,
                              max_query_len=40, max_seq_len=90)
    alone = paged_attention(dev(q[:1]), dev(k_cache), dev(v_cache), dev(tables[:1]), dev(seq_lens[:1]),
                            dev(starts[:2]), 0.2, max_query_len=1, max_seq_len=70)
    assert torch.equal(alone[0], batched[0])


def test_fp8_cache():
    """An fp8 (e4m3) cache: the kernel reads the same values the reference dequantizes."""
    q, k_cache, v_cache, tables, padded, starts = _case([40, 9], [6, 1], 4, 2, 32, 16, torch.float32)
    k8 = k_cache.to(torch.float8_e4m3fn)
    v8 = v_cache.to(torch.float8_e4m3fn)
    seq_lens = [40, 9]
    expected = _reference(q, k8.float(), v8.float(), tables, seq_lens, [6, 1], 0.25)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out = paged_attention(dev(q), dev(k8), dev(v8), dev(padded), dev(torch.tensor(seq_lens)), dev(starts), 0.25,
                          max_query_len=6, max_seq_len=40)
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-5, rtol=2e-5)
