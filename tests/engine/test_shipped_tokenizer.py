"""benchmarks/shapes/tokenizer*.json: the default model's tokenizer, shipped for random-weight
shapes on machines without the default model, gives the GGUF's ids and conventions."""

from __future__ import annotations

import pytest

from tests.engine.test_tokenizer import DEFAULT_MODEL_SAMPLES
from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.model_files import SHAPES_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizers(default_model_path):
    return Tokenizer.from_path(SHAPES_DIR), Tokenizer.from_path(default_model_path)


def test_it_is_small_enough_to_travel():
    size = sum((SHAPES_DIR / name).stat().st_size for name in ("tokenizer.json", "tokenizer_config.json"))
    assert size < 2_500_000


def test_it_encodes_and_decodes_as_the_gguf_does(tokenizers):
    shipped, gguf = tokenizers
    assert shipped.vocab_size == gguf.vocab_size == 49152
    assert (shipped.bos_token_id, shipped.eos_token_ids, shipped.add_bos_token) == \
        (gguf.bos_token_id, gguf.eos_token_ids, gguf.add_bos_token)
    for text in [*DEFAULT_MODEL_SAMPLES, "x  1 and abc   123", "naïve café 東京 🙂"]:
        ids = gguf.encode(text)
        assert shipped.encode(text) == ids, text
        assert shipped.decode(ids) == gguf.decode(ids)
        assert shipped.decode(ids, skip_special_tokens=False) == gguf.decode(ids, skip_special_tokens=False)


def test_it_renders_chats_as_the_gguf_does(tokenizers):
    shipped, gguf = tokenizers
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert shipped.chat_template == gguf.chat_template
    assert shipped.encode_chat(messages) == gguf.encode_chat(messages)
    assert shipped.apply_chat_template(messages[1:]) == gguf.apply_chat_template(messages[1:])
