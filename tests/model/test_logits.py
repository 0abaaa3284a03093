"""tokenloom's logits equal transformers' for every architecture and file format."""

from __future__ import annotations

import gguf
import pytest
import torch

from tests.helpers.tiny_models import TINY_KINDS, quantization_roundtrip, write_gguf
from tests.model.conftest import PROMPT, hf_logits
from tests.model.paged import prefill_logits
from tokenloom.model.loader import load_model

QType = gguf.GGMLQuantizationType


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_prefill_logits_match_transformers(tiny, kind, fmt):
    model, _ = load_model(tiny(kind).path(fmt), torch.float32, "cpu")
    ours = prefill_logits(model, PROMPT, block_size=4, chunks=[5, 8])
    assert ours.dtype == torch.float32 and ours.shape == (len(PROMPT), 512)
    torch.testing.assert_close(ours, hf_logits(tiny(kind).hf, PROMPT), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])  # permuted and unpermuted q/k
@pytest.mark.parametrize("qtype", [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1])
def test_quantized_gguf_matches_its_dequantized_weights(tiny, tmp_path, kind, qtype):
    hf = tiny(kind).hf
    path = write_gguf(hf, tmp_path / f"{kind}-{qtype.name}.gguf", tensor_type=qtype)
    model, _ = load_model(path, torch.float32, "cpu")
    ours = prefill_logits(model, PROMPT)
    reference = hf_logits(quantization_roundtrip(hf, qtype), PROMPT)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    # The quantization itself is visible: the file is not secretly full precision.
    assert (reference - hf_logits(hf, PROMPT)).abs().max() > 1e-4


def test_tied_embeddings_share_one_table(tiny):
    model, config = load_model(tiny("smollm").gguf_path, torch.float32, "cpu")
    assert config.tie_word_embeddings and model.lm_head is None
    hidden = torch.eye(64)[:3]
    expected = model.model.embed_tokens.weight[:, :3].T  # row i of logits = column i of the table
    torch.testing.assert_close(model.compute_logits(hidden), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_half_precision_logits_are_close(tiny, fmt, dtype):
    model, _ = load_model(tiny("llama3").path(fmt), dtype, "cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    ours = prefill_logits(model, PROMPT, chunks=[6, 7])
    reference = hf_logits(tiny("llama3").hf, PROMPT)
    assert ours.dtype == torch.float32
    # Logits have std ~0.8; half precision lands within a few hundredths.
    atol = 0.08 if dtype == torch.bfloat16 else 0.015
    torch.testing.assert_close(ours, reference, rtol=0, atol=atol)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
