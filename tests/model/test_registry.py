"""Architecture names -> model class, and clear errors for the rest."""

from __future__ import annotations

import json

import pytest
import torch

from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.loader import load_model
from tokenloom.model.registry import get_model_class, supported_architectures


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM",
                                          "Qwen2ForCausalLM", "llama", "mistral", "qwen2"])
def test_supported_architectures_map_to_llama(architecture):
    assert get_model_class(architecture) is LlamaForCausalLM


def test_supported_architectures_are_listed():
    assert supported_architectures() == ("LlamaForCausalLM", "MistralForCausalLM",
                                         "Qwen2ForCausalLM", "llama", "mistral", "qwen2")


def test_unknown_architecture_names_itself_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"'GPT2LMHeadModel'.*LlamaForCausalLM.*qwen2"):
        get_model_class("GPT2LMHeadModel")


def test_loading_an_unknown_architecture_fails_clearly(tiny, tmp_path):
    config = json.loads((tiny("llama3").hf_dir / "config.json").read_text())
    config["architectures"] = ["Phi3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model architecture 'Phi3ForCausalLM'"):
        load_model(tmp_path, torch.float32, "cpu")
