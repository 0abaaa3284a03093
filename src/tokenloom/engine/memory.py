"""Sizing the paged KV cache from a memory budget (never from max_model_len x max_num_seqs).

On CUDA the budget is what vLLM's ``--gpu-memory-utilization`` gives::

    |<------------------ utilization x total GPU memory ------------------>|
    | weights | activation peak of one forward | non-torch | KV cache ...  |
    |<--- torch's peak during the profile --->|  (CUDA context, libraries)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from tokenloom.config import ModelArchConfig

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Without a budget from the user, take this share of the RAM that is free at start-up,
# within [MIN, MAX]: generous enough for batching, modest enough to leave room for
# activations, the tokenizer and the rest of the machine.
DEFAULT_SHARE_OF_FREE_RAM = 0.25
MIN_DEFAULT_GIB = 0.25
MAX_DEFAULT_GIB = 4.0


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo; falls back to total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_memory_bytes()


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_kv_cache_fits(kv_bytes: int, weights_bytes: int, device_type: str) -> None:
    """A KV cache larger than the memory left once the weights are in is refused at
    startup, with the numbers, rather than failing at the first long load.

    Host tensors are allocated lazily (the OS hands out pages as they are touched),
    so without this check a cache of any size "fits" until requests fill it.
    """
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        where = "GPU memory"
    else:
        free, total = available_memory_bytes(), total_memory_bytes()
        where = "memory"
    if kv_bytes > free:
        raise ValueError(
            f"the KV cache would take {kv_bytes / GiB:.1f} GiB, but only {free / GiB:.1f} GiB of {where} is "
            f"available ({total / GiB:.1f} GiB in all, {weights_bytes / GiB:.2f} GiB of it taken by the model's "
            f"weights); ask for less (--kv-cache-memory or --gpu-memory-utilization; kv_cache_memory, "
            f"num_kv_blocks or gpu_memory_utilization in Python)")


@dataclass(frozen=True, slots=True)
class GpuMemoryProfile:
    """GPU memory around one profiled forward of the largest step, in bytes."""

    total_bytes: int  # the device's memory
    weights_bytes: int  # allocated before the forward (weights, and anything else already there)
    peak_bytes: int  # torch's allocator peak during the forward, weights included
    non_torch_bytes: int  # in use but not by torch's allocator: CUDA context, cuBLAS workspaces

    @property
    def activation_bytes(self) -> int:
        return self.peak_bytes - self.weights_bytes


def gpu_kv_cache_bytes(profile: GpuMemoryProfile, utilization: float) -> int:
    """The KV cache's share: ``utilization`` of the device, less the profiled peak and
    what torch does not see. ValueError when nothing is left."""
    budget = int(utilization * profile.total_bytes) - profile.peak_bytes - profile.non_torch_bytes
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {utilization} x {profile.total_bytes / GiB:.1f} GiB, less "
            f"{profile.weights_bytes / GiB:.2f} GiB of weights, a {profile.activation_bytes / GiB:.2f} GiB "
            f"activation peak and {profile.non_torch_bytes / GiB:.2f} GiB outside torch; raise "
            "--gpu-memory-utilization or lower --max-num-batched-tokens")
    return budget


def profile_gpu_memory(run_forward: Callable[[int], object], num_tokens: int, device,
                       scratch_bytes: int = 0) -> GpuMemoryProfile:
    """Run ``run_forward(num_tokens)`` (one forward of the largest step the scheduler
    can hand out, on dummy inputs) and measure the allocator's peak around it.
    ``scratch_bytes``: allocated for the profile alone and freed after it (its own
    small KV cache), so left out of the weights and the peak."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights_bytes = torch.cuda.memory_allocated(device) - scratch_bytes
    run_forward(num_tokens)
    torch.cuda.synchronize(device)
    peak_bytes = torch.cuda.max_memory_allocated(device) - scratch_bytes
    free, total = torch.cuda.mem_get_info(device)
    non_torch_bytes = max(0, total - free - torch.cuda.memory_reserved(device))
    return GpuMemoryProfile(total, weights_bytes, peak_bytes, non_torch_bytes)


def default_kv_cache_memory() -> float:
    """The default KV budget in GiB, derived from free RAM."""
    share = available_memory_bytes() * DEFAULT_SHARE_OF_FREE_RAM / GiB
    return min(MAX_DEFAULT_GIB, max(MIN_DEFAULT_GIB, share))


def kv_bytes_per_token(arch: ModelArchConfig, row_bytes: int) -> int:
    """K and V, every layer: 2 * layers * kv_heads * the bytes of one head's cache row
    (head_dim elements, plus a scale for int8 rows: layers/attention.py)."""
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * row_bytes


def num_kv_blocks(bytes_per_token: int, block_size: int, kv_cache_memory_gib: float) -> int:
    """Blocks of ``block_size`` tokens in the budget; ``bytes_per_token`` covers every cache
    a token occupies (the target's, and a draft model's with speculative decoding)."""
    per_block = bytes_per_token * block_size
    num_blocks = int(kv_cache_memory_gib * GiB) // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={kv_cache_memory_gib} GiB holds no KV block "
            f"(one block of {block_size} tokens needs {per_block} bytes)")
    return num_blocks


def resolve_max_model_len(requested: int | None, model_max: int, capacity_tokens: int) -> int:
    """The longest sequence the engine accepts: the model's context, capped so that a
    lone request always fits in the KV cache (so preemption can always make progress)."""
    if requested is not None:
        if requested > model_max:
            raise ValueError(f"max_model_len={requested} exceeds the model's context length {model_max}")
        if requested > capacity_tokens:
            raise ValueError(
                f"max_model_len={requested} does not fit in the KV cache ({capacity_tokens} tokens); "
                "raise kv_cache_memory or lower max_model_len")
        return requested
    if capacity_tokens < model_max:
        logger.warning("KV cache holds %d tokens, less than the model's context %d: "
                       "max_model_len capped to %d", capacity_tokens, model_max, capacity_tokens)
    return min(model_max, capacity_tokens)
