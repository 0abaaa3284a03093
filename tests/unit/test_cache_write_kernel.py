"""write_kv (csrc/cache_write.cpp) against the cast (or quantize_kv) + index_copy_ it replaces."""

from __future__ import annotations

import pytest
import torch

from tokenloom import kernels
from tokenloom.model.layers.attention import cache_rows_as, kv_row_width, quantize_kv, to_cache_rows, write_kv

try:
    OPS = kernels.ops()
except kernels.KernelsUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 6, 16, 3, 20  # 60 values a row: a tail past the 8-wide loop


def _case(num_tokens: int, cache_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = to_cache_rows(torch.randn(shape, generator=g), cache_dtype)
    v_cache = to_cache_rows(torch.randn(shape, generator=g), cache_dtype)
    q_size, kv_size = 4 * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=g) * 1000  # large values round in float16
    k = qkv[:, q_size:q_size + kv_size].contiguous().view(num_tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, q_size + kv_size:].view(num_tokens, KV_HEADS, HEAD_DIM)  # a strided view, as the layer passes
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:num_tokens]
    return k_cache, v_cache, k, v, slots


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("num_tokens", [1, 7, NUM_BLOCKS * BLOCK_SIZE])
def test_writes_the_same_bits_as_cast_and_index_copy(cache_dtype, num_tokens):
    k_cache, v_cache, k, v, slots = _case(num_tokens, cache_dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv(ref_k, ref_v, k, v, slots)  # the PyTorch path
    write_kv(k_cache, v_cache, k, v, slots, native=True)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    flat = k_cache.view(-1, KV_HEADS, kv_row_width(HEAD_DIM, cache_dtype))
    assert torch.equal(flat[slots[0]], to_cache_rows(k[0], cache_dtype))  # and the slots really were written


def test_int8_rows_hold_their_values_within_half_a_step():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, KV_HEADS, HEAD_DIM, generator=g) * torch.logspace(-3, 3, 50).view(50, 1, 1)
    x[0, 0] = 0.0  # an all-zero row: scale 0, values 0
    x[1, 1, 5] = -x[1, 1].abs().max() * 2  # the extreme value is negative: it maps to -127
    rows = quantize_kv(x)
    assert rows.shape == (50, KV_HEADS, HEAD_DIM + 4) and rows.dtype == torch.int8
    scale = rows[..., -4:].contiguous().view(torch.float32)  # [50, KV_HEADS, 1]
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127, rtol=0, atol=0)
    assert (cache_rows_as(rows, torch.float32) - x).abs().le(scale / 2 * (1 + 1e-6)).all()
    assert rows[1, 1, 5] == -127 and rows[..., :-4].abs().max() == 127
    assert torch.equal(cache_rows_as(rows[0, 0], torch.float32), torch.zeros(HEAD_DIM))


def test_untouched_slots_keep_their_values():
    k_cache, v_cache, k, v, slots = _case(5, torch.float16)
    before = k_cache.clone().view(-1, KV_HEADS, HEAD_DIM)
    OPS.write_kv(k_cache, v_cache, k, v, slots)
    others = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(k_cache.view(-1, KV_HEADS, HEAD_DIM)[others], before[others])


def test_rejects_slots_outside_the_cache_and_mismatched_rows():
    k_cache, v_cache, k, v, slots = _case(3, torch.float16)
    bad = slots.clone()
    bad[1] = NUM_BLOCKS * BLOCK_SIZE
    with pytest.raises(RuntimeError, match="outside the cache"):
        OPS.write_kv(k_cache, v_cache, k, v, bad)
    with pytest.raises(RuntimeError, match="heads x dims"):
        OPS.write_kv(k_cache, v_cache, k[:, :2], v[:, :2], slots)
    with pytest.raises(RuntimeError, match="one slot per row"):
        OPS.write_kv(k_cache, v_cache, k, v, slots[:2])
    with pytest.raises(RuntimeError, match="float32, float16 or int8"):
        OPS.write_kv(k_cache.bfloat16(), v_cache.bfloat16(), k, v, slots)


@pytest.mark.parametrize("native", [False, True])
def test_negative_slots_are_padding_and_write_nothing(native):
    """A batch padded to a static size (runner/cuda_graph.py) passes slot -1 for its tail."""
    k_cache, v_cache, k, v, slots = _case(4, torch.float16)
    padded = slots.clone()
    padded[1:3] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv(expected_k, expected_v, k[[0, 3]], v[[0, 3]], slots[[0, 3]])  # the real rows alone
    write_kv(k_cache, v_cache, k, v, padded, native=native)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
