"""Building blocks against their transformers counterparts and by hand."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import tiny_config
from tokenloom import kernels
from tokenloom.config import RopeScaling
from tokenloom.model.layers.attention import AttentionMetadata, paged_attention, write_kv
from tokenloom.model.layers.linear import MergedLinear
from tokenloom.model.layers.norm import RMSNorm
from tokenloom.model.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

LLAMA3 = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=256)


def _hf_rotary(rope_parameters: dict) -> LlamaRotaryEmbedding:
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                      max_position_embeddings=512,
                                      rope_parameters=rope_parameters)
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling, rope_parameters", [
    (RopeScaling(), {"rope_type": "default", "rope_theta": 10000.0}),
    (RopeScaling(kind="linear", factor=2.0),
     {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    (LLAMA3, {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 256}),
])
def test_inv_freq_matches_transformers(scaling, rope_parameters):
    ours = compute_inv_freq(16, 10000.0, scaling)
    assert torch.equal(ours, _hf_rotary(rope_parameters).inv_freq)


def test_llama3_scaling_keeps_divides_and_interpolates():
    plain = compute_inv_freq(16, 10000.0, RopeScaling())
    ratio = (plain / compute_inv_freq(16, 10000.0, LLAMA3)).tolist()
    # wavelengths 6.3, 19.9, 62.8 < 64 kept; 199 interpolated; >= 628 divided by 8
    assert ratio[:3] == [1.0, 1.0, 1.0]
    assert 1.0 < ratio[3] < 8.0
    assert ratio[4:] == pytest.approx([8.0] * 4, rel=1e-6)


def test_gguf_freq_factors_reproduce_llama3_scaling():
    plain = compute_inv_freq(16, 10000.0, RopeScaling())
    factors = plain / compute_inv_freq(16, 10000.0, LLAMA3)
    from_factors = compute_inv_freq(16, 10000.0, RopeScaling(), freq_factors=factors)
    torch.testing.assert_close(from_factors, compute_inv_freq(16, 10000.0, LLAMA3),
                               rtol=1e-6, atol=0)


def test_unsupported_rope_scaling_is_rejected():
    with pytest.raises(ValueError, match="'yarn'"):
        compute_inv_freq(16, 10000.0, RopeScaling(kind="yarn"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_transformers(dtype):
    rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 256}
    rotary = RotaryEmbedding(16, 512, 10000.0, LLAMA3, dtype, "cpu")
    positions = torch.tensor([0, 1, 7, 300, 511])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 16, generator=gen).to(dtype)  # [num_tokens, heads, head_dim]
    k = torch.randn(5, 2, 16, generator=gen).to(dtype)
    cos, sin = rotary.cos_sin(positions)
    hf_cos, hf_sin = _hf_rotary(rope_parameters)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                      hf_cos, hf_sin)
    assert torch.equal(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin), hf_k[0].transpose(0, 1))


def test_rotary_position_zero_is_identity():
    rotary = RotaryEmbedding(8, 16, 10000.0, RopeScaling(), torch.float32, "cpu")
    x = torch.arange(16.0).view(1, 2, 8)
    cos, sin = rotary.cos_sin(torch.tensor([0]))
    assert torch.equal(apply_rotary(x, cos, sin), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, generator=gen).to(dtype)
    x = (torch.randn(7, 64, generator=gen) * 3).to(dtype)
    ours = RMSNorm(64, 1e-6, dtype, "cpu")
    ours.weight.copy_(weight)
    ref = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(weight)
        assert torch.equal(ours(x), ref(x))


def test_merged_linear_shard_rows_and_forward():
    proj = MergedLinear(3, {"q": 4, "k": 2, "v": 2}, bias=True, dtype=torch.float32, device="cpu")
    assert proj.shard_rows("q") == slice(0, 4)
    assert proj.shard_rows("k") == slice(4, 6)
    assert proj.shard_rows("v") == slice(6, 8)
    with pytest.raises(KeyError, match="'o'"):
        proj.shard_rows("o")
    proj.weight.copy_(torch.arange(24.0).view(8, 3))
    proj.bias.copy_(torch.arange(8.0))
    out = proj(torch.tensor([[1.0, 0.0, -1.0]]))
    assert out.tolist() == [[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    assert [t.shape[-1] for t in out.split(proj.split_sizes, -1)] == [4, 2, 2]


def test_tiny_configs_are_what_the_tests_rely_on():
    assert tiny_config("qwen2").vocab_size >= 300
    assert tiny_config("smollm").tie_word_embeddings


@pytest.mark.parametrize("native", [False, True])
def test_attention_never_reads_unwritten_cache_slots(native):
    """KV caches are not initialised: NaN where nobody wrote must not reach any output."""
    if native and not kernels.available():
        pytest.skip("native kernels unavailable here")
    gen = torch.Generator().manual_seed(0)
    shape = (8, 4, 2, 64)  # blocks of 4 slots, 2 KV heads
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    tables = torch.tensor([[5, 2, 0], [7, 0, 0]])
    seq_lens = torch.tensor([10, 3])  # slots written: blocks 5, 2 and half of 0; 3 of block 7
    for row, length in zip(tables, seq_lens.tolist()):
        for pos in range(length):
            slot = (int(row[pos // 4]), pos % 4)
            k_cache[slot], v_cache[slot] = torch.randn(2, 64, generator=gen), torch.randn(2, 64, generator=gen)
    q = torch.randn(2, 4, 64, generator=gen)
    decode = AttentionMetadata(slot_mapping=torch.tensor([1, 30]), block_tables=tables,
                               seq_lens=seq_lens, query_start_loc=(0, 1, 2), seq_lens_host=(10, 3), block_size=4)
    out = paged_attention(q, k_cache, v_cache, decode, 0.125, native=native)
    assert torch.isfinite(out).all()
    chunk = AttentionMetadata(slot_mapping=torch.tensor([8, 9]), block_tables=tables[:1], seq_lens=seq_lens[:1],
                              query_start_loc=(0, 2), seq_lens_host=(10,), block_size=4)  # seq 0's last 2 tokens
    assert torch.isfinite(paged_attention(q, k_cache, v_cache, chunk, 0.125, native=native)).all()


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")
def test_int8_cache_plain_pytorch_path_matches_the_kernels():
    """The PyTorch path (any device) writes the same int8 rows as the kernels and
    attends over their dequantized values: decode steps and prompt chunks."""
    gen = torch.Generator().manual_seed(1)
    tables = torch.tensor([[5, 2, 0], [7, 1, 3]])
    seq_lens = torch.tensor([10, 7])
    slots = torch.tensor([int(row[p // 4]) * 4 + p % 4 for row, n in zip(tables, seq_lens.tolist())
                          for p in range(n)])
    k, v = torch.randn(17, 2, 64, generator=gen) * 3, torch.randn(17, 2, 64, generator=gen)
    caches = {}
    for native in (False, True):
        k_cache, v_cache = torch.zeros(8, 4, 2, 68, dtype=torch.int8), torch.zeros(8, 4, 2, 68, dtype=torch.int8)
        write_kv(k_cache, v_cache, k, v, slots, native=native)
        caches[native] = (k_cache, v_cache)
    assert torch.equal(caches[False][0], caches[True][0]) and torch.equal(caches[False][1], caches[True][1])
    q = torch.randn(5, 4, 64, generator=gen)
    decode = AttentionMetadata(slot_mapping=torch.tensor([9, 30]), block_tables=tables, seq_lens=seq_lens,
                               query_start_loc=(0, 1, 2), seq_lens_host=(10, 7), block_size=4)
    chunks = AttentionMetadata(slot_mapping=torch.tensor([6, 7, 8, 9, 13]), block_tables=tables,
                               seq_lens=seq_lens, query_start_loc=(0, 4, 5), seq_lens_host=(10, 7), block_size=4)
    for meta, rows in ((decode, q[:2]), (chunks, q)):
        ours = paged_attention(rows, *caches[True], meta, 0.125, native=True)
        plain = paged_attention(rows, *caches[False], meta, 0.125, native=False)
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
