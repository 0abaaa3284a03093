"""The test helpers themselves: complete model files with a tokenizer."""

from __future__ import annotations

import json

import gguf
import torch

from tests.helpers.tiny_models import make_tiny_model, save_hf_model, write_gguf
from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer
from tests.model.conftest import PROMPT
from tests.model.paged import prefill_logits
from tokenloom.model.loader import load_model


def test_same_seed_same_weights():
    a, b = make_tiny_model("qwen2", seed=3), make_tiny_model("qwen2", seed=3)
    c = make_tiny_model("qwen2", seed=4)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_model_files_with_tokenizer(tiny, tmp_path):
    hf = tiny("smollm").hf
    tokenizer = make_tiny_tokenizer(512)
    template = CHATML_TEMPLATE
    directory = save_hf_model(hf, tmp_path / "hf", tokenizer=tokenizer, chat_template=template)
    path = write_gguf(hf, tmp_path / "m.gguf", tokenizer=tokenizer, chat_template=template)

    assert json.loads((directory / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == template
    reader = gguf.GGUFReader(path)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 512
    assert reader.fields["tokenizer.chat_template"].contents() == template

    from_dir, _ = load_model(directory, torch.float32, "cpu")
    from_gguf, config = load_model(path, torch.float32, "cpu")
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    torch.testing.assert_close(prefill_logits(from_gguf, PROMPT), prefill_logits(from_dir, PROMPT),
                               rtol=0, atol=1e-5)
