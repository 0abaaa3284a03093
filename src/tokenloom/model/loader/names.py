"""Checkpoint tensor name -> parameter of ``LlamaForCausalLM``.

Our fused projections receive several checkpoint tensors each::

    HF   model.layers.3.self_attn.k_proj.weight  \\
    GGUF blk.3.attn_k.weight                     -> model.layers.3.self_attn.qkv_proj.weight
                                                    (rows of part "k")

``None`` means "known, not a parameter" (e.g. HF's cached ``rotary_emb.inv_freq``,
GGUF's ``rope_freqs``, which feeds the rotary embedding instead).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParamTarget:
    """Where one checkpoint tensor goes: a parameter and, for a fused
    projection, the part (``MergedLinear.shard_rows``) it fills."""

    param_name: str
    shard: str | None = None


# Per-layer module (HF / GGUF name) -> (our module, part of a fused projection).
_HF_LAYER_MODULES: dict[str, tuple[str, str | None]] = {
    "input_layernorm": ("input_layernorm", None),
    "post_attention_layernorm": ("post_attention_layernorm", None),
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "self_attn.o_proj": ("self_attn.o_proj", None),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
    "mlp.down_proj": ("mlp.down_proj", None),
}
_GGUF_LAYER_MODULES: dict[str, tuple[str, str | None]] = {
    "attn_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
    "attn_q": ("self_attn.qkv_proj", "q"),
    "attn_k": ("self_attn.qkv_proj", "k"),
    "attn_v": ("self_attn.qkv_proj", "v"),
    "attn_output": ("self_attn.o_proj", None),
    "ffn_gate": ("mlp.gate_up_proj", "gate"),
    "ffn_up": ("mlp.gate_up_proj", "up"),
    "ffn_down": ("mlp.down_proj", None),
}
_HF_GLOBAL = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
GGUF_ROPE_FREQS = "rope_freqs.weight"


def hf_param_target(name: str) -> ParamTarget | None:
    """Target of an HF safetensors tensor; ValueError for an unknown name."""
    if name in _HF_GLOBAL:
        return ParamTarget(_HF_GLOBAL[name])
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return _layer_target(name, _HF_LAYER_RE, _HF_LAYER_MODULES)


def gguf_param_target(name: str) -> ParamTarget | None:
    """Target of a GGUF tensor; ValueError for an unknown name."""
    if name in _GGUF_GLOBAL:
        return ParamTarget(_GGUF_GLOBAL[name])
    if name == GGUF_ROPE_FREQS:
        return None
    return _layer_target(name, _GGUF_LAYER_RE, _GGUF_LAYER_MODULES)


def _layer_target(name: str, pattern: re.Pattern[str],
                  modules: dict[str, tuple[str, str | None]]) -> ParamTarget:
    match = pattern.fullmatch(name)
    if match is None or match.group(2) not in modules:
        raise ValueError(f"unexpected tensor {name!r} in checkpoint")
    layer, module, kind = match.groups()
    ours, shard = modules[module]
    return ParamTarget(f"model.layers.{layer}.{ours}.{kind}", shard)
