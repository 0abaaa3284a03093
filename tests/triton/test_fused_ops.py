"""The Triton fused layer ops (kernels/triton/fused_ops.py) against their PyTorch references.

Without CUDA they run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenloom.config import RopeScaling
from tokenloom.kernels.triton import fused_ops
from tokenloom.model.layers.rotary import RotaryEmbedding, apply_rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) between two computations that round differently (summation order,
# exp/rsqrt implementations, an fma): about one step of the dtype, and tight for float32.
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1e-2)}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = TOL[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _assert_rounds_like(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Close, and in 16-bit types the same bits but for rare one-step flips (where the
    summation order or exp's last float32 bit moves a value across a rounding boundary):
    an extra or a missing rounding inside the kernel flips about half of them. Not bf16
    under the interpreter, which truncates float32 -> bfloat16 (see below)."""
    _assert_close(actual, expected)
    if actual.dtype == torch.float16 or (actual.dtype == torch.bfloat16 and actual.device.type == "cuda"):
        assert (actual != expected).float().mean().item() <= 0.02


def _assert_same_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bits for one float32 value rounded once to the dtype. The interpreter
    truncates float32 -> bfloat16 where the GPU rounds to nearest even, so there
    bf16 may be one step (at most 2**-7 relative) off."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.bfloat16 and actual.device.type != "cuda":
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The layer's reference (model/layers): statistic in float32, the normalized value
    cast back to the input dtype before the weight multiply."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _weight(hidden: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype=dtype, device=DEVICE)


def _rows(n: int, hidden: int, dtype: torch.dtype, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """[n, hidden] whose rows are strided (a column slice of a wider matrix), as the layers pass."""
    wide = torch.randn(n, hidden + 7, generator=g) * scale
    return wide.to(dtype=dtype, device=DEVICE)[:, 3:3 + hidden]


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 130])
def test_rms_norm_matches_the_reference(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    weight = _weight(hidden, dtype, g)
    x = _rows(5, hidden, dtype, g, scale=3.0)
    out = fused_ops.rms_norm(x, weight, 1e-6)
    assert out.is_contiguous()
    _assert_rounds_like(out, _reference_rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 130])
def test_add_rms_norm_matches_the_reference(dtype, hidden):
    g = torch.Generator().manual_seed(hidden + 1)
    weight = _weight(hidden, dtype, g)
    x, residual = _rows(5, hidden, dtype, g), _rows(5, hidden, dtype, g, scale=4.0)
    normed, total = fused_ops.add_rms_norm(x, residual, weight, 1e-5)
    ref_total = residual + x
    _assert_same_rounding(total, ref_total)  # rounded to the dtype before the statistic
    _assert_rounds_like(normed, _reference_rms_norm(ref_total, weight, 1e-5))


def test_norms_reject_a_mismatched_weight():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        fused_ops.rms_norm(x, torch.ones(9, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        fused_ops.add_rms_norm(x, x, torch.ones(8, dtype=torch.float16, device=DEVICE), 1e-6)


# ---------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 64), (6, 2, 128), (4, 4, 32), (3, 1, 80)])
def test_rotary_qk_matches_apply_rotary(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * 1000 + head_dim)
    n, max_position = 5, 64
    rope = RotaryEmbedding(head_dim, max_position, 10000.0, RopeScaling(), dtype, DEVICE)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = _rows(n, width, dtype, g, scale=2.0)  # a strided view, like a slice of a wider output
    assert not qkv.is_contiguous()
    positions = torch.tensor([17, 0, 63, 5, 17], device=DEVICE)  # unsorted, repeated, the last row
    q, k = fused_ops.rotary_qk(qkv, rope.cos_sin_cache, positions, heads, kv_heads, head_dim)
    assert q.shape == (n, heads, head_dim) and k.shape == (n, kv_heads, head_dim)
    assert q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype == dtype

    q_in = qkv[:, :heads * head_dim].reshape(n, heads, head_dim)
    k_in = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(n, kv_heads, head_dim)
    cos, sin = rope.cos_sin(positions)
    # The same float32 arithmetic rounded once, as the kernel does: equal bits but
    # for an fma's last float32 bit on the GPU.
    q32 = apply_rotary(q_in.float(), cos.float(), sin.float())
    k32 = apply_rotary(k_in.float(), cos.float(), sin.float())
    _assert_rounds_like(q, q32.to(dtype))
    _assert_rounds_like(k, k32.to(dtype))
    # The layer's own path rounds after every op in 16-bit types: close, not equal.
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3),
                  torch.bfloat16: (3e-2, 3e-2)}[dtype]
    torch.testing.assert_close(q, apply_rotary(q_in, cos, sin), rtol=rtol, atol=atol)
    torch.testing.assert_close(k, apply_rotary(k_in, cos, sin), rtol=rtol, atol=atol)


def test_rotary_qk_reads_a_float32_cache_for_a_16_bit_projection():
    heads, kv_heads, head_dim, n = 2, 1, 64, 3
    rope = RotaryEmbedding(head_dim, 16, 10000.0, RopeScaling(), torch.float32, DEVICE)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(torch.float16)
    positions = torch.tensor([3, 9, 1], device=DEVICE)
    q, k = fused_ops.rotary_qk(qkv, rope.cos_sin_cache, positions, heads, kv_heads, head_dim)
    cos, sin = rope.cos_sin(positions)
    ref = apply_rotary(qkv[:, :heads * head_dim].float().view(n, heads, head_dim), cos, sin)
    assert q.dtype == torch.float16
    torch.testing.assert_close(q, ref.half(), rtol=1e-3, atol=1e-3)


def test_rotary_qk_rejects_a_wrong_width():
    qkv = torch.randn(2, 5 * 8, device=DEVICE)
    cache = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="columns"):
        fused_ops.rotary_qk(qkv, cache, torch.zeros(2, dtype=torch.int64, device=DEVICE), 2, 2, 8)


# ---------------------------------------------------------------- gated SiLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [96, 130, 1500])  # 1500: two column tiles per row
def test_silu_and_mul_matches_torch(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    x = _rows(3, 2 * inter, dtype, g, scale=4.0)
    out = fused_ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    assert out.shape == (3, inter) and out.is_contiguous()
    _assert_rounds_like(out, F.silu(gate) * up)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp
def test_silu_and_mul_at_the_ends_of_exp():
    x = torch.tensor([[-200.0, -90.0, 90.0, 0.0, 1.0, 2.0, 3.0, -1.0]], device=DEVICE)
    gate, up = x.chunk(2, dim=-1)
    _assert_close(fused_ops.silu_and_mul(x), F.silu(gate) * up)
