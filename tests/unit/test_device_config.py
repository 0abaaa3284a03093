"""The "auto" device, dtype and quantization, resolved once (resolve_device_defaults),
the device's token budget (resolve_scheduler_defaults), and the validation of the new options."""

from __future__ import annotations

import pytest

from tokenloom.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    resolve_device_defaults,
    resolve_scheduler_defaults,
)


def test_defaults_are_auto():
    config = ModelConfig()
    assert (config.device, config.dtype, config.quantization, config.load_format) == ("auto",) * 4
    assert CacheConfig().gpu_memory_utilization == 0.9


def test_without_a_gpu_auto_is_the_cpu_in_float32_with_its_quantized_kernels():
    resolved = resolve_device_defaults(ModelConfig(), cuda_available=False)
    assert (resolved.device, resolved.dtype, resolved.quantization) == ("cpu", "float32", "auto")


def test_with_a_gpu_auto_is_cuda_in_bfloat16_with_dense_weights():
    resolved = resolve_device_defaults(ModelConfig(), cuda_available=True)
    assert (resolved.device, resolved.dtype, resolved.quantization) == ("cuda", "bfloat16", "none")


def test_an_explicit_device_decides_the_dtype_whatever_torch_sees():
    cpu = resolve_device_defaults(ModelConfig(device="cpu"), cuda_available=True)
    assert (cpu.device, cpu.dtype, cpu.quantization) == ("cpu", "float32", "auto")
    cuda1 = resolve_device_defaults(ModelConfig(device="cuda:1"), cuda_available=False)
    assert (cuda1.device, cuda1.dtype, cuda1.quantization) == ("cuda:1", "bfloat16", "none")


def test_the_token_budget_is_the_devices_unless_given():
    assert SchedulerConfig().max_num_batched_tokens is None
    for device, budget in (("cpu", 512), ("cuda", 2048), ("cuda:1", 2048)):
        assert resolve_scheduler_defaults(SchedulerConfig(), device).max_num_batched_tokens == budget
    given = SchedulerConfig(max_num_batched_tokens=4096)
    assert resolve_scheduler_defaults(given, "cpu").max_num_batched_tokens == 4096


def test_async_scheduling_is_on_for_cuda_on_one_rank_without_speculation_unless_given():
    def overlap(device, *args, given=None):
        return resolve_scheduler_defaults(SchedulerConfig(async_scheduling=given), device, *args).async_scheduling

    assert (overlap("cpu"), overlap("cuda"), overlap("cuda:1")) == (False, True, True)
    assert (overlap("cuda", True), overlap("cuda", False, True)) == (False, False)  # speculative, -tp > 1
    assert (overlap("cpu", given=True), overlap("cuda", given=False)) == (True, False)
    with pytest.raises(ValueError, match="speculative decoding"):
        EngineConfig(scheduler=SchedulerConfig(async_scheduling=True),
                     speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3)).validate()
    with pytest.raises(ValueError, match="tensor parallelism"):
        EngineConfig(scheduler=SchedulerConfig(async_scheduling=True),
                     parallel=ParallelConfig(tensor_parallel_size=2)).validate()


def test_explicit_choices_are_kept():
    config = ModelConfig(device="cuda", dtype="float16", quantization="int8", load_format="dummy", seed=5)
    assert resolve_device_defaults(config, cuda_available=True) == config
    cpu = ModelConfig(device="cpu", dtype="bfloat16", quantization="none")
    assert resolve_device_defaults(cpu, cuda_available=False) == cpu


def test_resolution_returns_a_new_config():
    config = ModelConfig()
    resolved = resolve_device_defaults(config, cuda_available=False)
    assert resolved is not config and config.device == "auto"


@pytest.mark.parametrize("config, field", [
    (ModelConfig(load_format="safetensors"), "load_format"),
    (ModelConfig(dtype="float8"), "dtype"),
    (ModelConfig(device=""), "device"),
])
def test_bad_model_options_are_refused(config, field):
    with pytest.raises(ValueError, match=field):
        config.validate()


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_gpu_memory_utilization_must_be_a_share(value):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=value).validate()
    CacheConfig(gpu_memory_utilization=1.0).validate()
