"""The fused native ops against their PyTorch definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenloom import kernels
from tokenloom.model.layers.rotary import apply_rotary

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_rms_norm_and_the_residual_add_before_it():
    x, residual, weight = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    ops = kernels.ops()
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), _reference_rms_norm(x, weight, 1e-5),
                               rtol=1e-5, atol=1e-6)
    normed, total = ops.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, residual + x)
    torch.testing.assert_close(normed, _reference_rms_norm(residual + x, weight, 1e-6), rtol=1e-5, atol=1e-6)


def test_rotary_qk_rotates_q_and_k_out_of_the_fused_projection():
    heads, kv_heads, dim, n = 4, 2, 16, 6
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim)
    freqs = torch.arange(50, dtype=torch.float32)[:, None] * torch.rand(dim // 2)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_position, dim]
    positions = torch.tensor([0, 3, 7, 7, 20, 49])
    q, k = kernels.ops().rotary_qk(qkv, cache, positions, heads, kv_heads, dim)
    cos, sin = cache[positions].unsqueeze(1).chunk(2, dim=-1)
    q_ref = apply_rotary(qkv[:, :heads * dim].view(n, heads, dim), cos, sin)
    k_ref = apply_rotary(qkv[:, heads * dim:(heads + kv_heads) * dim].view(n, kv_heads, dim), cos, sin)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="position 50 outside"):
        kernels.ops().rotary_qk(qkv, cache, torch.tensor([0, 1, 2, 3, 4, 50]), heads, kv_heads, dim)


@pytest.mark.parametrize("columns", [2 * 1536, 2 * 13])  # vector body, and a scalar tail only
def test_silu_and_mul_over_the_whole_range(columns):
    x = torch.randn(3, columns) * 6
    x[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0])  # exp's clamps, both ways
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.ops().silu_and_mul(x), F.silu(gate) * up, rtol=1e-6, atol=1e-6)
