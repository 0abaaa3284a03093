"""Reading configs from HF directories and GGUF files; loader errors."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenloom.config import ModelArchConfig, RopeScaling
from tokenloom.model.loader import load_model, read_arch_config

LLAMA3_SCALING = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=256)


def _expected(architecture: str, **changes) -> ModelArchConfig:
    fields = dict(architecture=architecture, vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1,
                  eos_token_ids=(2,))
    return ModelArchConfig(**{**fields, **changes})


HF_CONFIGS = {
    "llama3": _expected("LlamaForCausalLM", rope_scaling=LLAMA3_SCALING),
    "qwen2": _expected("Qwen2ForCausalLM", rope_theta=1e6, attention_bias=True,
                       rope_scaling=RopeScaling(kind="linear", factor=2.0)),
    "mistral": _expected("MistralForCausalLM", head_dim=32),
    "smollm": _expected("LlamaForCausalLM", num_hidden_layers=3, num_key_value_heads=1,
                        rope_theta=1e5, tie_word_embeddings=True),
}


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_hf_config(tiny, kind):
    assert read_arch_config(tiny(kind).hf_dir) == HF_CONFIGS[kind]


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_gguf_config_matches_hf_config(tiny, kind):
    config = read_arch_config(tiny(kind).gguf_path)
    gguf_arch = "qwen2" if kind == "qwen2" else "llama"
    # llama3 scaling travels as the rope_freqs tensor, not as metadata.
    scaling = RopeScaling() if kind == "llama3" else HF_CONFIGS[kind].rope_scaling
    expected = HF_CONFIGS[kind]
    assert config.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32
    assert config == ModelArchConfig(**{
        **{f: getattr(expected, f) for f in ModelArchConfig.__slots__},
        "architecture": gguf_arch, "rope_scaling": scaling, "rms_norm_eps": config.rms_norm_eps})


def _copy_hf_dir(tiny, kind, tmp_path):
    return shutil.copytree(tiny(kind).hf_dir, tmp_path / kind)


def test_generation_config_eos_ids_are_merged(tiny, tmp_path):
    directory = _copy_hf_dir(tiny, "llama3", tmp_path)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    assert read_arch_config(directory).eos_token_ids == (2, 7, 9)


def _edit_config(directory, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_sliding_window_limits_the_context(tiny, tmp_path):
    directory = _copy_hf_dir(tiny, "mistral", tmp_path)
    _edit_config(directory, sliding_window=128)
    assert read_arch_config(directory).max_position_embeddings == 128
    _edit_config(directory, sliding_window=128, use_sliding_window=False)  # Qwen2's switch
    assert read_arch_config(directory).max_position_embeddings == 512


def test_transformers4_rope_layout(tiny, tmp_path):
    directory = _copy_hf_dir(tiny, "qwen2", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    (directory / "config.json").write_text(json.dumps(config))
    loaded = read_arch_config(directory)
    assert (loaded.rope_theta, loaded.rope_scaling) == (5e5, RopeScaling(kind="linear", factor=4.0))


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"quantized HF checkpoint \(gptq\)"),
])
def test_unsupported_hf_features_are_rejected(tiny, tmp_path, changes, message):
    directory = _copy_hf_dir(tiny, "llama3", tmp_path)
    _edit_config(directory, **changes)
    with pytest.raises(ValueError, match=message):
        read_arch_config(directory)


def _rewrite_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_reported(tiny, tmp_path):
    directory = _copy_hf_dir(tiny, "llama3", tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    message = r"lacks 1 tensors: model.layers.1.self_attn.qkv_proj.weight\[v\]"
    with pytest.raises(ValueError, match=message):
        load_model(directory, torch.float32, "cpu")


def test_unknown_tensor_is_reported(tiny, tmp_path):
    directory = _copy_hf_dir(tiny, "llama3", tmp_path)
    extra = {"model.layers.0.mlp.extra.weight": torch.ones(2)}
    _rewrite_weights(directory, lambda t: t.update(extra))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(directory, torch.float32, "cpu")


def test_shape_mismatch_is_reported(tiny, tmp_path):
    directory = _copy_hf_dir(tiny, "llama3", tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint shape \(32,\)"):
        load_model(directory, torch.float32, "cpu")


def test_sharded_checkpoint_loads_like_a_single_file(tiny, tmp_path):
    hf = tiny("smollm").hf
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded, _ = load_model(tmp_path, torch.float32, "cpu")
    single, _ = load_model(tiny("smollm").hf_dir, torch.float32, "cpu")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name


def test_not_a_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor a directory"):
        read_arch_config(tmp_path)


def _metadata_only_gguf(path, arch: str, **extra: int):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_vocab_size(512)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_eos_token_id(2)
    for key, value in extra.items():
        writer.add_uint32(key.format(arch=arch), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_end_of_turn_tokens_count_as_eos(tmp_path):
    path = _metadata_only_gguf(tmp_path / "m.gguf", "llama",
                               **{"tokenizer.ggml.eot_token_id": 7,
                                  "{arch}.attention.sliding_window": 256})
    config = read_arch_config(path)
    assert config.eos_token_ids == (2, 7)
    assert config.num_key_value_heads == 4 and config.head_dim == 16
    assert config.max_position_embeddings == 256
    assert config.bos_token_id is None


def test_gguf_partial_rotary_is_rejected(tmp_path):
    path = _metadata_only_gguf(tmp_path / "m.gguf", "llama", **{"{arch}.rope.dimension_count": 8})
    with pytest.raises(ValueError, match="partial rotary"):
        read_arch_config(path)


def test_gguf_unknown_architecture(tmp_path):
    path = _metadata_only_gguf(tmp_path / "m.gguf", "gpt2")
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        read_arch_config(path)
