"""--kv-cache-dtype: which element type the engine's KV cache gets, and that decoding works in it."""

from __future__ import annotations

import gguf
import pytest
import torch

from tests.helpers.tiny_models import write_gguf
from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer
from tokenloom import kernels
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.entrypoints.llm import LLM
from tokenloom.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def q4_gguf(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("kvdtype") / "tiny-q4_1.gguf"
    return write_gguf(tiny_checkpoint.hf, path, tokenizer=make_tiny_tokenizer(512), chat_template=CHATML_TEMPLATE,
                      tensor_type=gguf.GGMLQuantizationType.Q4_1)


def _cache_dtype(engine: LLMEngine) -> torch.dtype:
    dtypes = {t.dtype for pair in engine.runner.kv_caches for t in pair}
    assert len(dtypes) == 1
    return dtypes.pop()


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")
def test_auto_is_int8_only_with_quantized_weights(tiny_checkpoint, q4_gguf):
    quantized = LLMEngine.from_options(str(q4_gguf), num_kv_blocks=32)
    exact = LLMEngine.from_options(str(q4_gguf), quantization="none", num_kv_blocks=32)
    dense = LLMEngine.from_options(str(tiny_checkpoint.gguf_path), num_kv_blocks=32)  # F32 file: auto is dense
    assert _cache_dtype(quantized) == torch.int8
    assert _cache_dtype(exact) == torch.float32 and _cache_dtype(dense) == torch.float32


@pytest.mark.parametrize(("kv", "tolerance"), [("float16", 1e-2), ("int8", 3e-2)])
def test_smaller_caches_decode_close_to_float32(tiny_checkpoint, kv, tolerance):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompts = [[1, 17, 300, 45, 211, 9, 498, 120, 33], [5, 404, 250]]
    outs = {}
    for dtype in ("float32", kv):
        llm = LLM(str(tiny_checkpoint.hf_dir), kv_cache_dtype=dtype, num_kv_blocks=32)
        assert _cache_dtype(llm.engine) == getattr(torch, dtype)
        outs[dtype] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for a, b in zip(outs["float32"], outs[kv]):
        first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        token = a.outputs[0].token_ids[0]
        assert b.outputs[0].token_ids[0] == token
        assert abs(first_a[token].logprob - first_b[token].logprob) < tolerance


def test_fp8_cache_holds_the_float8_cast_of_each_key_and_value(tiny_checkpoint):
    """fp8 (e4m3, no scale): a prompt's K/V rows are exactly the float32 rows cast (in the
    first layer; later layers' rows depend on attention over the cast cache)."""
    prompt = [1, 17, 300, 45, 211, 9, 498, 120, 33]
    caches = {}
    for kv in ("float32", "fp8"):
        llm = LLM(str(tiny_checkpoint.hf_dir), kv_cache_dtype=kv, num_kv_blocks=1, enable_prefix_caching=False)
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 1
        caches[kv] = [t[0, :len(prompt)] for t in llm.engine.runner.kv_caches[0]]
    assert caches["fp8"][0].dtype == torch.float8_e4m3fn
    for rows32, rows8 in zip(caches["float32"], caches["fp8"]):
        assert torch.equal(rows8.view(torch.uint8), rows32.to(torch.float8_e4m3fn).view(torch.uint8))


def test_int8_cache_holds_more_blocks_in_the_same_memory(tiny_checkpoint):
    """A row of head_dim int8 values and a 4-byte scale, against head_dim float16s."""
    arch_head_dim = {}
    blocks = {}
    for kv in ("float16", "int8"):
        engine = LLMEngine.from_options(str(tiny_checkpoint.hf_dir), kv_cache_dtype=kv, kv_cache_memory=0.01)
        arch_head_dim[kv] = engine.arch.head_dim
        blocks[kv] = engine.config.cache.num_blocks
        assert engine.runner.kv_caches[0][0].shape[0] == blocks[kv]
    head_dim = arch_head_dim["int8"]
    assert blocks["int8"] == pytest.approx(blocks["float16"] * 2 * head_dim / (head_dim + 4), abs=1)


def test_unknown_kv_cache_dtype_is_rejected(tiny_checkpoint):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLMEngine.from_options(str(tiny_checkpoint.hf_dir), kv_cache_dtype="int4", num_kv_blocks=32)
