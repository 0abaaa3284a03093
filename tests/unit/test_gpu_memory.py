"""KV cache sizing on CUDA (vLLM's --gpu-memory-utilization), with fake numbers: CI has no GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenloom.config import EngineConfig, ModelArchConfig, ModelConfig
from tokenloom.engine import llm_engine
from tokenloom.engine.gpu_profile import profile_batch
from tokenloom.engine.memory import GiB, GpuMemoryProfile, gpu_kv_cache_bytes

ARCH = ModelArchConfig("LlamaForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=4096)
# 2 (K, V) x 2 layers x 2 KV heads x 16 values x 4 bytes (float32) per token.
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


def test_the_kv_cache_gets_the_share_less_the_profiled_peak_and_what_torch_does_not_see():
    profile = GpuMemoryProfile(total_bytes=80 * GiB, weights_bytes=16 * GiB, peak_bytes=19 * GiB,
                               non_torch_bytes=GiB // 2)
    assert profile.activation_bytes == 3 * GiB
    assert gpu_kv_cache_bytes(profile, 0.9) == int(0.9 * 80 * GiB) - 19 * GiB - GiB // 2  # 52.5 GiB
    assert gpu_kv_cache_bytes(profile, 1.0) == 60 * GiB + GiB // 2


def test_nothing_left_for_the_cache_is_an_error_with_the_numbers():
    profile = GpuMemoryProfile(total_bytes=24 * GiB, weights_bytes=16 * GiB, peak_bytes=20 * GiB, non_torch_bytes=0)
    with pytest.raises(ValueError, match=r"16\.00 GiB of weights, a 4\.00 GiB activation peak.*--gpu-memory-util"):
        gpu_kv_cache_bytes(profile, 0.8)


def test_the_profile_step_is_the_largest_a_scheduler_can_hand_out():
    out = profile_batch(2048, max_num_seqs=256, block_size=16, max_len=4096)
    lengths = [sr.num_new_tokens for sr in out.scheduled]
    assert out.num_batched_tokens == sum(lengths) == 2048
    assert lengths == [1] * 255 + [1793]  # the sampler's largest batch, attention's longest prompt
    assert all(sr.sample and sr.num_computed_tokens == 0 for sr in out.scheduled)
    blocks = [b for sr in out.scheduled for b in sr.block_ids]
    assert blocks == list(range(len(blocks)))  # every sequence on blocks of its own
    assert [len(sr.block_ids) for sr in out.scheduled] == [1] * 255 + [113]


def test_the_long_prompt_is_split_at_the_models_context_and_few_tokens_give_few_sequences():
    assert [sr.num_new_tokens for sr in profile_batch(100, 1, 16, max_len=40).scheduled] == [40, 40, 20]
    assert [sr.num_new_tokens for sr in profile_batch(8, 256, 16, max_len=40).scheduled] == [1] * 8


def config_with(**cache) -> EngineConfig:
    base = EngineConfig(model=ModelConfig(device="cpu", dtype="float32"))
    return dataclasses.replace(base, cache=dataclasses.replace(base.cache, **cache))


def never() -> float:
    raise AssertionError("the automatic budget was consulted")


@pytest.mark.parametrize("cache, num_blocks", [({"num_blocks": 7}, 7),
                                               ({"kv_cache_memory": 0.001}, int(0.001 * GiB) // (16 * BYTES_PER_TOKEN))])
def test_a_size_the_user_gave_wins_over_the_automatic_one(cache, num_blocks):
    resolved = llm_engine._resolve_config(config_with(**cache), ARCH, 0, never, [(ARCH, torch.float32)])
    assert resolved.cache.num_blocks == num_blocks


def test_without_a_size_the_automatic_budget_sets_the_blocks():
    resolved = llm_engine._resolve_config(config_with(), ARCH, 0, lambda: 0.002, [(ARCH, torch.float32)])
    assert resolved.cache.num_blocks == int(0.002 * GiB) // (16 * BYTES_PER_TOKEN)


def test_on_the_cpu_the_automatic_budget_is_the_share_of_free_ram(monkeypatch):
    monkeypatch.setattr(llm_engine, "default_kv_cache_memory", lambda: 1.5)
    monkeypatch.setattr(llm_engine, "profile_forward", lambda *a: pytest.fail("profiled on the CPU"))
    assert llm_engine._auto_kv_cache_memory(config_with(), None, ARCH, torch.float32, torch.device("cpu"), None) == 1.5


def test_on_cuda_the_automatic_budget_comes_from_the_profile(monkeypatch):
    profile = GpuMemoryProfile(total_bytes=100 * GiB, weights_bytes=10 * GiB, peak_bytes=12 * GiB, non_torch_bytes=0)
    monkeypatch.setattr(llm_engine, "profile_forward", lambda *a: profile)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    config = config_with(gpu_memory_utilization=0.5)
    budget = llm_engine._auto_kv_cache_memory(config, None, ARCH, torch.bfloat16, torch.device("cuda"), None)
    assert budget == 38.0  # 0.5 x 100 - 12


class FakeRanks:
    """Rank 0's TensorParallel as the budget sees it: every rank's profile."""

    def __init__(self, others: list[GpuMemoryProfile]) -> None:
        self.others = others

    def profile(self, request, own):
        return [own(), *self.others]


def test_with_tensor_parallel_gpus_the_tightest_rank_sets_the_budget(monkeypatch):
    mine = GpuMemoryProfile(total_bytes=100 * GiB, weights_bytes=10 * GiB, peak_bytes=12 * GiB, non_torch_bytes=0)
    busier = dataclasses.replace(mine, peak_bytes=20 * GiB)  # another process holds part of that GPU
    monkeypatch.setattr(llm_engine, "profile_forward", lambda *a: mine)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    config = config_with(gpu_memory_utilization=0.5)
    budget = llm_engine._auto_kv_cache_memory(config, None, ARCH, torch.bfloat16, torch.device("cuda"),
                                              FakeRanks([busier, mine]))
    assert budget == 30.0  # 0.5 x 100 - 20


def with_ranks(config: EngineConfig, size: int, device: str) -> EngineConfig:
    return dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tensor_parallel_size=size),
                               model=dataclasses.replace(config.model, device=device))


def test_tensor_parallel_ranks_share_the_hosts_kv_budget_but_each_gpu_has_its_own():
    arch = dataclasses.replace(ARCH, num_attention_heads=9, num_key_value_heads=3)  # ranks hold 1 and 2 kv heads
    on_cpu = llm_engine._kv_caches(with_ranks(config_with(), 2, "cpu"), arch, torch.float32, None)
    assert [a.num_key_value_heads for a, _ in on_cpu] == [1, 2]  # both in the host's memory: 3 heads in all
    on_cuda = llm_engine._kv_caches(with_ranks(config_with(), 2, "cuda"), arch, torch.float32, None)
    assert [a.num_key_value_heads for a, _ in on_cuda] == [2]  # each GPU its own; the fuller one decides
    resolved = llm_engine._resolve_config(config_with(kv_cache_memory=0.001), arch, 0, never, on_cpu)
    assert resolved.cache.num_blocks == int(0.001 * GiB) // (16 * 2 * 2 * 3 * 16 * 4)
