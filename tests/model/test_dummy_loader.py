"""load_model(..., load_format="dummy"): random weights in a config's shape, drawn on the
model's device from a seed, run as a float checkpoint is."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.shapes import write_shape
from tokenloom.model.layers.linear import Linear
from tokenloom.model.loader import load_model
from tokenloom.model.loader.dummy import DUMMY_WEIGHT_STD


def test_weights_are_normal_with_unit_norms_in_the_config_shape(tmp_path):
    model, arch = load_model(write_shape(tmp_path / "tiny.json"), torch.float32, "cpu", load_format="dummy")
    assert (arch.hidden_size, arch.num_hidden_layers, arch.vocab_size) == (64, 2, 49152)
    params = dict(model.named_parameters())
    assert params["model.embed_tokens.weight"].shape == (49152, 64)
    for name, param in params.items():
        assert param.dtype == torch.float32 and torch.isfinite(param).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert abs(param.std().item() - DUMMY_WEIGHT_STD) < 0.2 * DUMMY_WEIGHT_STD, name
            assert abs(param.mean().item()) < 0.1 * DUMMY_WEIGHT_STD, name


def test_the_seed_fixes_the_weights(tmp_path):
    shape = write_shape(tmp_path / "tiny.json")

    def embedding(seed: int) -> torch.Tensor:
        model, _ = load_model(shape, torch.float32, "cpu", load_format="dummy", seed=seed)
        return model.model.embed_tokens.weight

    assert torch.equal(embedding(7), embedding(7))
    assert not torch.equal(embedding(7), embedding(8))


def test_qwen2_biases_are_filled_and_the_dtype_is_the_one_asked(tmp_path):
    shape = write_shape(tmp_path / "qwen.json", architectures=["Qwen2ForCausalLM"])
    model, arch = load_model(shape, torch.bfloat16, "cpu", load_format="dummy")
    bias = model.model.layers[0].self_attn.qkv_proj.bias
    assert arch.attention_bias and bias is not None
    assert bias.dtype == torch.bfloat16 and 0.01 < bias.float().std().item() < 0.03


def test_auto_quantization_keeps_random_weights_dense_as_for_a_safetensors_checkpoint(tmp_path):
    model, _ = load_model(write_shape(tmp_path / "tiny.json"), torch.float32, "cpu", "auto", load_format="dummy")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.quantized is None for m in linears)
    assert model.logits_quantized is None


def test_an_hf_directory_gives_its_shape_and_its_weights_are_not_read(tmp_path):
    directory = write_shape(tmp_path / "hf", num_hidden_layers=3).parent
    (directory / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_model(directory, torch.float32, "cpu")  # the real loader reads the (broken) weights
    model, arch = load_model(directory, torch.float32, "cpu", load_format="dummy")
    assert arch.num_hidden_layers == 3 and len(model.model.layers) == 3


def test_unknown_load_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="load_format"):
        load_model(write_shape(tmp_path / "tiny.json"), torch.float32, "cpu", load_format="safetensors")
