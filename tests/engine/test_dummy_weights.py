"""LLM(..., load_format="dummy"): a model of a shape's size from random weights, run end to end."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.shapes import write_shape
from tokenloom import LLM, SamplingParams
from tokenloom.engine.gpu_profile import profile_batch
from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.model.loader import load_model
from tokenloom.model_files import SHAPES_DIR
from tokenloom.runner.model_runner import ModelRunner

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def greedy(shape, seed: int, **options) -> list[list[int]]:
    llm = LLM(str(shape), load_format="dummy", seed=seed, num_kv_blocks=64, **options)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
    return write_shape(tmp_path_factory.mktemp("shape") / "tiny.json")


def test_generation_is_fixed_by_the_seed(shape):
    first = greedy(shape, seed=1)
    assert all(len(tokens) == 8 for tokens in first)
    assert greedy(shape, seed=1) == first
    assert greedy(shape, seed=2) != first


def test_a_bare_shape_runs_on_the_cpu_in_float32_with_the_shipped_tokenizer(shape):
    llm = LLM(str(shape), load_format="dummy", num_kv_blocks=64)
    resolved = llm.engine.config.model
    assert (resolved.device, resolved.dtype, resolved.quantization) == ("cpu", "float32", "auto")
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float32  # dense weights: a float cache
    shipped = Tokenizer.from_path(SHAPES_DIR)
    assert llm.tokenizer.vocab_size == shipped.vocab_size == 49152
    assert llm.tokenizer.encode(PROMPTS[1]) == shipped.encode(PROMPTS[1])


def test_a_checkpoints_shape_and_own_tokenizer_are_used(tiny_checkpoint):
    for path in (tiny_checkpoint.hf_dir, tiny_checkpoint.gguf_path):
        llm = LLM(str(path), load_format="dummy", num_kv_blocks=64)
        assert llm.engine.arch.hidden_size == tiny_checkpoint.hf.config.hidden_size
        assert llm.tokenizer.vocab_size == 512  # the checkpoint's tokenizer, not the shipped one
        [out] = llm.generate("hello", GREEDY, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 8


def test_the_profile_step_runs_through_a_runner(shape):
    """The step that sizes a GPU's KV cache is one a runner can execute (here on the CPU)."""
    model, arch = load_model(shape, torch.float32, "cpu", load_format="dummy")
    out = profile_batch(300, max_num_seqs=4, block_size=16, max_len=arch.max_position_embeddings)
    num_blocks = 1 + max(b for sr in out.scheduled for b in sr.block_ids)
    runner = ModelRunner(model, arch, num_blocks, 16, torch.float32, torch.device("cpu"))
    result = runner.execute(out)
    assert result.request_ids == tuple(sr.request_id for sr in out.scheduled) and len(result.sampled) == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_auto_is_bfloat16_dense_and_the_cache_fills_the_memory_share(shape):
    llm = LLM(str(shape), load_format="dummy", gpu_memory_utilization=0.5, max_num_batched_tokens=512)
    resolved = llm.engine.config.model
    assert (resolved.device, resolved.dtype, resolved.quantization) == ("cuda", "bfloat16", "none")
    k_cache = llm.engine.runner.kv_caches[0][0]
    assert k_cache.is_cuda and k_cache.dtype == torch.bfloat16
    total = torch.cuda.mem_get_info()[1]
    assert 0.3 * total < torch.cuda.memory_allocated() <= 0.5 * total
    [out] = llm.generate("hello", GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gguf_loads_on_cuda_dequantized_and_greedy_matches_the_cpu(tiny_checkpoint):
    path = str(tiny_checkpoint.gguf_path)
    cpu = LLM(path, device="cpu", quantization="none", num_kv_blocks=64)
    cuda = LLM(path, device="cuda", dtype="float32", num_kv_blocks=64)
    assert cuda.engine.config.model.quantization == "none"
    assert cuda.engine.runner.kv_caches[0][0].is_cuda
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in cuda.generate(PROMPTS, params, use_tqdm=False)] == expected
