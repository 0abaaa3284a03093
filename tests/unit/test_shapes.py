"""Model shapes for --load-format dummy: shipped names, config files, HF directories,
and the tokenizer each one gets."""

from __future__ import annotations

import pytest

from tests.helpers.shapes import write_shape
from tokenloom.model.loader import read_arch_config
from tokenloom.model_files import (
    SHAPES_DIR,
    ModelNotFoundError,
    resolve_model_shape,
    resolve_tokenizer,
    shape_names,
    shape_tokenizer,
)

SHIPPED = ("llama-3.1-8b", "llama-3.2-1b", "mistral-7b", "qwen2-7b")


def test_the_shipped_shapes_are_found_by_name_from_the_source_tree():
    assert SHAPES_DIR.is_dir() and set(SHIPPED) <= set(shape_names())
    assert "tokenizer" not in shape_names() and "tokenizer_config" not in shape_names()
    for name in SHIPPED:
        assert resolve_model_shape(name) == SHAPES_DIR / f"{name}.json"
    assert resolve_model_shape("Llama-3.1-8B") == SHAPES_DIR / "llama-3.1-8b.json"


@pytest.mark.parametrize("name, expected", [
    # (hidden, intermediate, layers, heads, kv heads, head_dim, rope_theta, q/k/v bias)
    ("llama-3.1-8b", (4096, 14336, 32, 32, 8, 128, 500000.0, False)),
    ("qwen2-7b", (3584, 18944, 28, 28, 4, 128, 1e6, True)),
    ("mistral-7b", (4096, 14336, 32, 32, 8, 128, 10000.0, False)),
])
def test_shipped_shapes_have_the_real_architectures_sizes(name, expected):
    arch = read_arch_config(resolve_model_shape(name))
    assert (arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers, arch.num_attention_heads,
            arch.num_key_value_heads, arch.head_dim, arch.rope_theta, arch.attention_bias) == expected
    # The default model's vocabulary and special ids, so that its tokenizer fits.
    assert (arch.vocab_size, arch.bos_token_id, arch.eos_token_ids) == (49152, 1, (2,))


def test_llama_3_1_has_its_rope_scaling_and_mistral_its_window():
    scaling = read_arch_config(resolve_model_shape("llama-3.1-8b")).rope_scaling
    assert (scaling.kind, scaling.factor, scaling.original_max_position_embeddings) == ("llama3", 8.0, 8192)
    assert read_arch_config(resolve_model_shape("mistral-7b")).max_position_embeddings == 4096


def test_an_unknown_name_is_refused_with_the_known_shapes_listed():
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model_shape("llama-9-400b")
    message = str(excinfo.value)
    assert "llama-9-400b" in message and all(name in message for name in SHIPPED)


def test_without_the_shapes_directory_the_error_says_where_it_looked(tmp_path):
    missing = tmp_path / "no-shapes"
    with pytest.raises(ModelNotFoundError, match="no-shapes"):
        resolve_model_shape("llama-3.1-8b", missing)


def test_paths_are_taken_as_they_are(tmp_path):
    shape = write_shape(tmp_path / "mine.json")
    directory = write_shape(tmp_path / "hf").parent
    assert resolve_model_shape(str(shape)) == shape
    assert resolve_model_shape(str(directory)) == directory


def test_a_bare_shape_gets_the_shipped_tokenizer_and_a_model_its_own(tmp_path):
    shape = write_shape(tmp_path / "mine.json")
    bare_dir = write_shape(tmp_path / "bare").parent
    with_tokenizer = write_shape(tmp_path / "hf").parent
    (with_tokenizer / "tokenizer.json").write_text("{}")
    assert resolve_tokenizer("llama-3.1-8b") == SHAPES_DIR
    assert shape_tokenizer(shape) == SHAPES_DIR
    assert shape_tokenizer(bare_dir) == SHAPES_DIR
    assert shape_tokenizer(with_tokenizer) == with_tokenizer
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert shape_tokenizer(gguf) == gguf
