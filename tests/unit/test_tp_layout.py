"""Which heads, rows and vocabulary each tensor-parallel rank holds: exact ranges."""

from __future__ import annotations

import dataclasses

import pytest

from tokenloom.config import ModelArchConfig
from tokenloom.parallel.layout import take, tp_shard

SMOLLM2_135M = ModelArchConfig("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
LLAMA_1B = ModelArchConfig("llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                           num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64)


def ranges(arch: ModelArchConfig, size: int) -> list[tuple]:
    return [(s.q_heads, s.kv_heads, s.intermediate, s.vocab) for s in (tp_shard(arch, size, r) for r in range(size))]


def test_heads_split_by_kv_group_unevenly_where_the_groups_do():
    assert ranges(SMOLLM2_135M, 2) == [((0, 3), (0, 1), (0, 768), (0, 24576)),
                                       ((3, 9), (1, 3), (768, 1536), (24576, 49152))]
    assert ranges(SMOLLM2_135M, 3) == [((0, 3), (0, 1), (0, 512), (0, 16384)),
                                       ((3, 6), (1, 2), (512, 1024), (16384, 32768)),
                                       ((6, 9), (2, 3), (1024, 1536), (32768, 49152))]


def test_more_ranks_than_kv_heads_replicate_each_kv_head():
    shards = [tp_shard(LLAMA_1B, 16, r) for r in range(16)]
    assert [s.q_heads for s in shards[:3]] == [(0, 2), (2, 4), (4, 6)]
    assert [s.kv_heads for s in shards] == [(r // 2, r // 2 + 1) for r in range(16)]  # each kv head on 2 ranks
    assert all(s.intermediate_size == 512 for s in shards)  # 2 super-blocks of 256 each


def test_intermediate_rows_split_on_quant_block_boundaries():
    # 5632 = 22 x 256 (TinyLlama): 3 ranks get 7, 7 and 8 super-blocks.
    arch = dataclasses.replace(LLAMA_1B, intermediate_size=5632)
    assert [tp_shard(arch, 3, r).intermediate for r in range(3)] == [(0, 1792), (1792, 3584), (3584, 5632)]
    # 96 = 3 x 32: no super-block, so blocks of 32.
    small = dataclasses.replace(LLAMA_1B, intermediate_size=96)
    assert [tp_shard(small, 2, r).intermediate for r in range(2)] == [(0, 32), (32, 96)]


def test_param_slices_name_the_rows_or_columns_of_each_tensor():
    shard = tp_shard(SMOLLM2_135M, 2, 1)
    assert shard.param_slice("model.layers.0.self_attn.qkv_proj.weight", "q") == (0, 192, 576)
    assert shard.param_slice("model.layers.0.self_attn.qkv_proj.bias", "k") == (0, 64, 192)
    assert shard.param_slice("model.layers.0.self_attn.o_proj.weight", None) == (1, 192, 576)
    assert shard.param_slice("model.layers.0.mlp.gate_up_proj.weight", "up") == (0, 768, 1536)
    assert shard.param_slice("model.layers.0.mlp.down_proj.weight", None) == (1, 768, 1536)
    assert shard.param_slice("model.embed_tokens.weight", None) == (0, 24576, 49152)
    assert shard.param_slice("lm_head.weight", None) == (0, 24576, 49152)
    assert shard.param_slice("model.layers.0.input_layernorm.weight", None) is None
    assert tp_shard(SMOLLM2_135M, 1, 0).param_slice("model.embed_tokens.weight", None) is None
    rows = [[10 * r + c for c in range(4)] for r in range(3)]
    import torch

    assert take(torch.tensor(rows), (1, 1, 3)).tolist() == [[1, 2], [11, 12], [21, 22]]


@pytest.mark.parametrize("size, message", [(4, "9 q heads and 3 kv heads"), (0, "rank 0 of 0 is not a rank")])
def test_impossible_splits_are_refused_with_the_reason(size, message):
    with pytest.raises(ValueError, match=message):
        tp_shard(SMOLLM2_135M, size, 0)
