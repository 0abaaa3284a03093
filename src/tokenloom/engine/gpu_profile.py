"""The GPU memory of one forward of the largest step, for sizing the KV cache on CUDA
(``engine.memory.gpu_kv_cache_bytes``).
"""

from __future__ import annotations

from functools import partial

import torch

from tokenloom.config import EngineConfig, ModelArchConfig
from tokenloom.engine.memory import GpuMemoryProfile, profile_gpu_memory
from tokenloom.runner.model_runner import ModelRunner
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ScheduledRequest, SchedulerOutput


def profile_forward(config: EngineConfig, model: torch.nn.Module, arch: ModelArchConfig,
                     kv_dtype: torch.dtype, device: torch.device, peer: bool = False) -> GpuMemoryProfile:
    """One forward of the largest step (``max_num_batched_tokens``: a step of dummy prompts,
    sampling included) through a runner with a cache just big enough for it. That small
    cache is freed afterwards, so it is left out of the figures. ``peer``: a
    tensor-parallel rank other than 0, profiling in lockstep with rank 0 (no sampling)."""
    num_tokens, block_size = config.scheduler.max_num_batched_tokens, config.cache.block_size
    batch = partial(profile_batch, max_num_seqs=config.scheduler.max_num_seqs, block_size=block_size,
                    max_len=arch.max_position_embeddings)
    num_blocks = 1 + max(b for sr in batch(num_tokens).scheduled for b in sr.block_ids)
    before = torch.cuda.memory_allocated(device)
    runner = ModelRunner(model, arch, num_blocks, block_size, kv_dtype, device, config.scheduler.max_num_seqs,
                         arch.max_position_embeddings)
    cache_bytes = torch.cuda.memory_allocated(device) - before
    step = runner.run_peer_step if peer else runner.execute
    return profile_gpu_memory(lambda n: step(batch(n)), num_tokens, device, scratch_bytes=cache_bytes)


def profile_batch(num_tokens: int, max_num_seqs: int, block_size: int, max_len: int) -> SchedulerOutput:
    """A step of ``num_tokens`` dummy prompt tokens that is as big as a real one can be:
    ``max_num_seqs`` sequences sample (the sampler's largest batch) and one long prompt
    holds the other tokens (attention's largest), split where it would pass ``max_len``
    (the model's context: positions beyond it have no rotary entry). Each sequence has
    blocks of its own."""
    num_short = min(max_num_seqs, num_tokens) - 1
    rest = num_tokens - num_short
    lengths = [1] * num_short + [min(max_len, rest - start) for start in range(0, rest, max_len)]
    params = SamplingParams(temperature=0.0)
    scheduled, next_block = [], 0
    for i, n in enumerate(lengths):
        blocks = tuple(range(next_block, next_block + -(-n // block_size)))
        next_block += len(blocks)
        tokens = (0,) * n
        scheduled.append(ScheduledRequest(f"profile-{i}", tokens, 0, n, blocks, True, params, tokens, (), seed=0))
    return SchedulerOutput(tuple(scheduled), num_tokens)
