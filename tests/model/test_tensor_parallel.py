"""A model split over tensor-parallel ranks (CPU, gloo) computes what it computes whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.tensor_parallel import tensor_parallel_logits
from tests.helpers.tiny_models import QType, random_kquant, save_hf_model, tiny_config, write_gguf
from tests.model.conftest import PROMPT
from tests.model.paged import prefill_logits
from tokenloom.gguf_file import GGUFFile
from tokenloom.model.loader import load_model
from tokenloom.model.loader.dequant import dequantize_tensor
from tokenloom.model.loader.gguf import _shard_data
from tokenloom.parallel.layout import take

# (kind, kv heads, ranks): kv 1 is replicated on both ranks, kv 2 gives one each, kv 4
# two each, and 3 ranks over kv 4 split 1 / 1 / 2.
CASES = [("smollm", 1, 2), ("llama3", 2, 2), ("llama3", 4, 2), ("qwen2", 2, 2), ("mistral", 2, 2),
         ("llama3", 4, 3)]


def tiny_with_kv_heads(kind: str, kv_heads: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind)
    config.num_key_value_heads = kv_heads
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(kind: str, kv_heads: int):
        if (kind, kv_heads) not in made:
            hf = tiny_with_kv_heads(kind, kv_heads)
            root = tmp_path_factory.mktemp(f"{kind}-kv{kv_heads}")
            made[kind, kv_heads] = (save_hf_model(hf, root / "hf"), write_gguf(hf, root / "f32.gguf"),
                                    write_gguf(hf, root / "q8.gguf", QType.Q8_0))
        return made[kind, kv_heads]

    return get


def whole_logits(path, quantization: str = "none", load_format: str = "auto") -> torch.Tensor:
    model, _ = load_model(path, torch.float32, "cpu", quantization, load_format, seed=3)
    with torch.inference_mode():
        return prefill_logits(model, PROMPT, block_size=4, chunks=[9, 3, 1])


@pytest.mark.parametrize("kind, kv_heads, size", CASES)
def test_split_logits_equal_the_whole_models(checkpoints, kind, kv_heads, size):
    hf_dir, gguf_path, _ = checkpoints(kind, kv_heads)
    expected = whole_logits(hf_dir)
    for path in (hf_dir, gguf_path):  # safetensors read by slice; GGUF rows and columns
        got = tensor_parallel_logits(path, size, PROMPT)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_dummy_weights_on_two_ranks_are_the_one_rank_models(checkpoints):
    """Each rank draws every parameter whole from the seed and keeps its part (Qwen2: the
    fused q/k/v bias too)."""
    hf_dir, _, _ = checkpoints("qwen2", 2)
    expected = whole_logits(hf_dir / "config.json", load_format="dummy")
    got = tensor_parallel_logits(hf_dir / "config.json", 2, PROMPT, load_format="dummy")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_quantized_gguf_splits_on_block_boundaries(checkpoints):
    """Q8_0 blocks of 32 along K: o_proj and down_proj columns split between blocks, and
    each rank runs the native kernels on its part of the file's own blocks."""
    _, _, q8 = checkpoints("llama3", 4)
    expected = whole_logits(q8, "auto")
    got = tensor_parallel_logits(q8, 2, PROMPT, "auto")
    # The same int8 products, summed in another order across the ranks' halves.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q6_K])
@pytest.mark.parametrize("cut", [(0, 8, 24), (1, 256, 512)])
def test_a_tensors_part_read_from_the_file_is_that_part_of_its_values(tmp_path, qtype, cut):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    rng = np.random.default_rng(0)
    values = rng.standard_normal((32, 768)).astype(np.float32)
    if qtype in (QType.Q4_K, QType.Q6_K):  # gguf writes no K-quants: random blocks, sane scales
        data = random_kquant(rng, values.shape, qtype)
    else:
        data = values.astype(np.float16) if qtype == QType.F16 else gguf.quants.quantize(values, qtype)
    writer.add_tensor("w", data, raw_dtype=qtype)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    tensor = GGUFFile(tmp_path / "t.gguf").tensor("w")
    whole = dequantize_tensor(tensor.data, qtype, tensor.shape, torch.float32, "cpu")
    part, shape = _shard_data(tensor, cut)
    assert torch.equal(dequantize_tensor(part, qtype, shape, torch.float32, "cpu"), take(whole, cut))


def test_columns_off_a_block_boundary_are_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    values = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_down.weight", random_kquant(np.random.default_rng(0), values.shape, QType.Q4_K),
                      raw_dtype=QType.Q4_K)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    tensor = GGUFFile(tmp_path / "t.gguf").tensor("blk.0.ffn_down.weight")
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight \(Q4_K, blocks of 256\).*columns 0\.\.128"):
        _shard_data(tensor, (1, 0, 128))
