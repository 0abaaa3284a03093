"""benchmarks/random_model.py: a Hugging Face directory of random weights in a named shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.shapes import write_shape
from tokenloom.model.loader import load_model

ROOT = Path(__file__).resolve().parents[2]


def test_a_shape_file_becomes_a_loadable_checkpoint_with_the_default_tokenizer(tmp_path, default_model_path):
    shape = json.loads((ROOT / "benchmarks/shapes/llama-3.2-1b.json").read_text())
    shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)  # the 1B file's keys, a tiny size
    (tmp_path / "tiny.json").write_text(json.dumps(shape))
    out = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/random_model.py"), str(tmp_path / "tiny.json"), str(out),
                    "--tokenizer-from", str(default_model_path)], check=True, capture_output=True)
    model, config = load_model(out, torch.float32, "cpu")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 49152)
    assert config.tie_word_embeddings and config.num_key_value_heads == 2
    embedding = model.model.embed_tokens.weight
    assert 0.015 < embedding.std().item() < 0.025  # normal(0, 0.02), stored as bf16
    assert (out / "tokenizer.json").is_file()


def test_without_a_tokenizer_source_the_shipped_tokenizer_is_copied(tmp_path):
    out = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/random_model.py"), str(write_shape(tmp_path / "s.json")),
                    str(out)], check=True, capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ROOT / "benchmarks/shapes" / name).read_bytes()
    assert load_model(out, torch.float32, "cpu")[1].vocab_size == 49152
