"""Hugging Face checkpoint directories: config.json + *.safetensors (sharded or not)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenloom.config import ModelArchConfig, RopeScaling
from tokenloom.model.layers.backend import select_ops
from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.loader.names import ParamTarget, hf_param_target
from tokenloom.model.loader.quantize import apply_quantization
from tokenloom.model.loader.weights import load_weights
from tokenloom.model.registry import get_model_class
from tokenloom.parallel.group import SINGLE, TPGroup
from tokenloom.parallel.layout import TPShard, take


def read_hf_config(source: Path) -> ModelArchConfig:
    """ModelArchConfig from ``config.json`` (transformers 4 and 5 layouts),
    with end-of-sequence ids merged from ``generation_config.json`` next to it.
    ``source`` is the directory holding config.json, or a JSON file of that
    layout (a shape file of benchmarks/shapes)."""
    config_file = source / "config.json" if source.is_dir() else source
    raw = json.loads(config_file.read_text())
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ValueError(f"{config_file} names no architecture")
    architecture = architectures[0]
    _reject_unsupported(raw)
    heads = raw["num_attention_heads"]
    rope_theta, rope_scaling = _rope(raw)
    return ModelArchConfig(
        architecture=architecture,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_context_length(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias and its config has no switch for it.
        attention_bias=bool(raw.get("attention_bias", architecture == "Qwen2ForCausalLM")),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_token_ids(config_file.parent, raw),
    )


def load_hf_model(directory: Path, dtype: torch.dtype, device: torch.device | str,
                  quantization: str = "none", group: TPGroup = SINGLE) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """``quantization``: see ``loader/quantize.py`` (a float checkpoint has no
    blocks of its own, so "auto" keeps it dense). With tensor parallelism only this
    rank's part of each tensor is read (safetensors slices)."""
    config = read_hf_config(directory)
    return build_float_model(config, dtype, device, quantization,
                             lambda model: load_weights(model, _iter_weights(directory, model.shard)), group)


def build_float_model(config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                      quantization: str, fill: Callable[[LlamaForCausalLM], object],
                      group: TPGroup = SINGLE) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """The model of ``config`` (this rank's part of it, under tensor parallelism), its
    parameters filled by ``fill`` with float values (a checkpoint's, or random ones),
    then made ready to run as any float checkpoint."""
    model = get_model_class(config.architecture)(config, dtype, device, group=group)
    fill(model)
    apply_quantization(model, quantization, {})
    model.use_ops(select_ops(torch.device(device), dtype))
    return model.eval(), config


def _reject_unsupported(raw: dict[str, Any]) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r} (only silu)")
    if raw.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=true")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ValueError(f"unsupported quantized HF checkpoint ({method}); use a GGUF file")


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers 5 writes "rope_parameters" (theta included); 4.x wrote
    # "rope_theta" next to an optional "rope_scaling".
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")


def _context_length(raw: dict[str, Any]) -> int:
    # Sliding-window attention is not implemented, so a windowed model is
    # limited to its window, inside which full attention computes the same thing.
    length = int(raw["max_position_embeddings"])
    window = raw.get("sliding_window")
    if window is not None and raw.get("use_sliding_window", True):
        length = min(length, int(window))
    return length


def _eos_token_ids(directory: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    sources = [raw.get("eos_token_id")]
    generation_config = directory / "generation_config.json"
    if generation_config.exists():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    ids: list[int] = []
    for source in sources:
        for token_id in source if isinstance(source, list) else [source]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    # Mistral repos also ship consolidated.safetensors (same weights, other names).
    files = sorted(p for p in directory.glob("*.safetensors")
                   if not p.name.startswith("consolidated"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return files


def _iter_weights(directory: Path, shard: TPShard) -> Iterator[tuple[ParamTarget, torch.Tensor]]:
    """Each tensor's part that ``shard`` holds, read by slice (nothing more is read)."""
    for path in _safetensors_files(directory):
        with safe_open(path, framework="pt", device="cpu") as checkpoint:
            for name in checkpoint.keys():
                target = hf_param_target(name)
                if target is None:
                    continue
                cut = shard.param_slice(target.param_name, target.shard)
                yield target, (checkpoint.get_tensor(name) if cut is None else take(checkpoint.get_slice(name), cut))
