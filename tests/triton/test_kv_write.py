"""The Triton KV write (kernels/triton/kv_write.py) against the cast + index_copy_ it replaces.

Without CUDA it runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from tokenloom.kernels.triton.kv_write import write_kv
from tokenloom.model.layers.attention import write_kv as reference_write_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_BLOCKS, HEADS = 4, 4
FP8 = torch.float8_e4m3fn


def _kv(n: int, kv_heads: int, head_dim: int, dtype: torch.dtype, g: torch.Generator):
    """k, v [n, kv_heads, head_dim] as strided views of a fused qkv output, as the layer passes."""
    q_size, kv_size = HEADS * head_dim, kv_heads * head_dim
    qkv = (torch.randn(n, q_size + 2 * kv_size, generator=g) * 3).to(dtype=dtype, device=DEVICE)
    k = qkv[:, q_size:q_size + kv_size].view(n, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(n, kv_heads, head_dim)
    return k, v


def _nan_caches(block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    shape = (NUM_BLOCKS, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), device=DEVICE).to(dtype)
    return k_cache, k_cache.clone()


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, one_step: bool = False) -> None:
    # one_step: float32 -> bfloat16, which the interpreter truncates where the GPU
    # rounds to nearest even (one bf16 step, at most 2**-7 relative).
    rtol = 2**-7 if one_step and actual.device.type != "cuda" else 0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.parametrize("src_dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads,head_dim", [(1, 64), (2, 128), (2, 80)])
def test_writes_what_index_copy_writes(src_dtype, cache_dtype, block_size, kv_heads, head_dim):
    g = torch.Generator().manual_seed(block_size + head_dim)
    n = 7
    k, v = _kv(n, kv_heads, head_dim, src_dtype, g)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=g)[:n].to(DEVICE)  # unsorted, any block
    k_cache, v_cache = _nan_caches(block_size, kv_heads, head_dim, cache_dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference_write_kv(ref_k, ref_v, k, v, slots)
    write_kv(k_cache, v_cache, k, v, slots)
    one_step = src_dtype == torch.float32 and cache_dtype == torch.bfloat16
    _assert_same(k_cache, ref_k, one_step)
    _assert_same(v_cache, ref_v, one_step)


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("block_size", [16, 32])
def test_padding_slots_write_nothing(slot_dtype, block_size):
    g = torch.Generator().manual_seed(3)
    kv_heads, head_dim = 2, 64
    k, v = _kv(6, kv_heads, head_dim, torch.float16, g)
    last = NUM_BLOCKS * block_size - 1
    slots = torch.tensor([-1, 5, last, -1, block_size, -1], dtype=slot_dtype, device=DEVICE)
    k_cache, v_cache = _nan_caches(block_size, kv_heads, head_dim, torch.float16)
    write_kv(k_cache, v_cache, k, v, slots)

    valid = slots >= 0
    written = slots[valid].long()
    ref_k, ref_v = _nan_caches(block_size, kv_heads, head_dim, torch.float16)
    reference_write_kv(ref_k, ref_v, k[valid], v[valid], written)
    _assert_same(k_cache, ref_k)
    _assert_same(v_cache, ref_v)
    untouched = torch.ones(NUM_BLOCKS * block_size, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, kv_heads, head_dim)
        assert flat[untouched].isnan().all() and not flat[written].isnan().any()


def test_an_all_padding_batch_and_an_empty_one_leave_the_cache_alone():
    g = torch.Generator().manual_seed(4)
    k, v = _kv(3, 1, 32, torch.float32, g)
    k_cache, v_cache = _nan_caches(16, 1, 32, torch.float32)
    write_kv(k_cache, v_cache, k, v, torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    write_kv(k_cache, v_cache, k[:0], v[:0], torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert k_cache.isnan().all() and v_cache.isnan().all()


def test_float8_stores_value_over_scale():
    # float8 values times a power of two: value / scale is exact in float8, so this checks
    # the scaling and the addressing, not the rounding (the interpreter's float8 rounding
    # is not the hardware's; the CUDA test below checks that).
    g = torch.Generator().manual_seed(5)
    kv_heads, head_dim, block_size = 2, 64, 16
    shape = (5, kv_heads, head_dim)
    k8 = (torch.randn(shape, generator=g) * 4).to(FP8).to(DEVICE)
    v8 = (torch.randn(shape, generator=g) * 4).to(FP8).to(DEVICE)
    k, v = k8.float() * 0.5, v8.float() * 4.0
    slots = torch.tensor([9, -1, 0, 63, 30], device=DEVICE)
    k_cache, v_cache = _nan_caches(block_size, kv_heads, head_dim, FP8)
    write_kv(k_cache, v_cache, k, v, slots, k_scale=0.5, v_scale=4.0)
    valid = slots >= 0
    for cache, expected in ((k_cache, k8), (v_cache, v8)):
        flat = cache.view(-1, kv_heads, head_dim)
        assert torch.equal(flat[slots[valid]].view(torch.uint8), expected[valid].view(torch.uint8))
        assert flat[1:9].float().isnan().all()  # untouched rows stay NaN


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 conversion needs a CUDA GPU of compute capability 8.9+")
def test_float8_rounds_like_torch_on_cuda():
    g = torch.Generator().manual_seed(6)
    k, v = _kv(9, 2, 128, torch.bfloat16, g)
    slots = torch.randperm(NUM_BLOCKS * 16, generator=g)[:9].to(DEVICE)
    k_cache, v_cache = _nan_caches(16, 2, 128, FP8)
    write_kv(k_cache, v_cache, k, v, slots, k_scale=0.37, v_scale=1.0)
    # x / scale may differ in float32's last bit (an approximate division): one float8 step.
    for cache, x, scale in ((k_cache, k, 0.37), (v_cache, v, 1.0)):
        got = cache.view(-1, 2, 128)[slots].float()
        torch.testing.assert_close(got, (x.float() / scale).to(FP8).float(), rtol=2**-3, atol=2**-9)


def test_rejects_a_scale_on_a_16_bit_cache_and_an_int8_cache():
    k, v = _kv(2, 1, 32, torch.float16, torch.Generator().manual_seed(0))
    slots = torch.tensor([0, 1], device=DEVICE)
    k_cache, v_cache = _nan_caches(16, 1, 32, torch.float16)
    with pytest.raises(ValueError, match="float8"):
        write_kv(k_cache, v_cache, k, v, slots, k_scale=2.0)
    int8 = torch.zeros(NUM_BLOCKS, 16, 1, 32, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="not supported"):
        write_kv(int8, int8.clone(), k, v, slots)
