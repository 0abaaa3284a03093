"""GGUF files (llama.cpp): metadata -> ModelArchConfig, tensors -> parameters.

llama.cpp's converter permutes the rows of q/k projections for the "llama"
family so that its rotary kernel can rotate adjacent pairs. Per head::

    HF rows   [r0 r1 ... r(d/2-1) | r(d/2) ... r(d-1)]      pairs (i, i + d/2)
    GGUF rows [r0 r(d/2) r1 r(d/2+1) ...]                   pairs (2i, 2i + 1)

Our rotary uses the HF layout, so those rows are put back on load. Qwen2 files
are written unpermuted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from tokenloom.config import ModelArchConfig, RopeScaling
from tokenloom.gguf_file import GGUFFile, GGUFTensor
from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.layers.backend import select_ops
from tokenloom.model.layers.quantization import QuantizedWeight
from tokenloom.model.loader.dequant import dequantize_tensor, quantized_blocks, requantized_blocks
from tokenloom.model.loader.names import GGUF_ROPE_FREQS, ParamTarget, gguf_param_target
from tokenloom.model.loader.quantize import PackedParts, apply_quantization
from tokenloom.model.loader.weights import load_weights
from tokenloom.model.registry import get_model_class
from tokenloom.parallel.group import SINGLE, TPGroup
from tokenloom.parallel.layout import TPShard, take

_PERMUTED_ARCHS = ("llama", "mistral")
_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
             "tokenizer.ggml.eom_token_id")


def read_gguf_config(file: GGUFFile) -> ModelArchConfig:
    """ModelArchConfig from a GGUF file's metadata (``architecture`` is the GGUF
    arch name, e.g. "llama"). End-of-generation ids include EOT/EOM tokens."""
    arch = _field(file, "general.architecture")
    get_model_class(arch)  # unsupported arch: fail before reading arch-specific keys
    hidden = _field(file, f"{arch}.embedding_length")
    heads = _field(file, f"{arch}.attention.head_count")
    head_dim = _field(file, f"{arch}.attention.key_length", hidden // heads)
    rope_dim = _field(file, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embedding ({rope_dim} of {head_dim} dims) "
                         "is not supported")
    eos_ids = [_field(file, key, None) for key in _EOS_KEYS]
    return ModelArchConfig(
        architecture=arch,
        vocab_size=_vocab_size(file, arch),
        hidden_size=hidden,
        intermediate_size=_field(file, f"{arch}.feed_forward_length"),
        num_hidden_layers=_field(file, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_field(file, f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=_field(file, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_field(file, f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(file, arch),
        max_position_embeddings=_context_length(file, arch),
        tie_word_embeddings=file.tensor("output.weight") is None,
        attention_bias=file.tensor("blk.0.attn_q.bias") is not None,
        bos_token_id=_field(file, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
    )


def load_gguf_model(source: Path | GGUFFile, dtype: torch.dtype, device: torch.device | str,
                    quantization: str = "none", group: TPGroup = SINGLE) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """Build and fill the model of a GGUF file. A caller that also reads the
    tokenizer from the file can pass it open (the vocabulary is parsed once).
    ``quantization``: see ``loader/quantize.py``. With tensor parallelism, only this
    rank's part of each tensor is read (quantized blocks split on block boundaries)."""
    file = source if isinstance(source, GGUFFile) else GGUFFile(source)
    config = read_gguf_config(file)
    model = get_model_class(config.architecture)(config, dtype, device, rope_freq_factors=_rope_freq_factors(file),
                                                 group=group)
    packed: PackedParts = {}
    keep_blocks = quantization != "none"

    def weights() -> Iterator[tuple[ParamTarget, torch.Tensor | QuantizedWeight]]:
        for target, weight, blocks in _iter_weights(file, config, dtype, device, keep_blocks, model.shard):
            if blocks is not None:
                packed[(target.param_name, target.shard)] = blocks
            yield target, weight

    deferred = load_weights(model, weights())
    apply_quantization(model, quantization, packed, deferred)
    model.use_ops(select_ops(torch.device(device), dtype))
    return model.eval(), config


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation; ``weight`` is [num_heads * head_dim, ...]."""
    rows = weight.shape[0]
    by_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return by_head.transpose(1, 2).reshape(weight.shape)


def _iter_weights(file: GGUFFile, config: ModelArchConfig, dtype: torch.dtype,
                  device: torch.device | str, keep_blocks: bool, shard: TPShard,
                  ) -> Iterator[tuple[ParamTarget, torch.Tensor | QuantizedWeight, QuantizedWeight | None]]:
    """(target, weight, the quantized blocks the kernels take if ``keep_blocks``), of
    ``shard``'s part of each tensor. The weight is dense, or the blocks themselves for
    a projection with blocks and for an embedding stored in a kind the kernels take
    (lookups then read its rows from the blocks): no dense copy is made of what
    runs on blocks (see ``load_weights``)."""
    heads_of_shard = {"q": shard.num_heads, "k": shard.num_kv_heads}  # the heads this rank holds
    permuted = config.architecture in _PERMUTED_ARCHS
    for tensor in file.tensors:
        target = gguf_param_target(tensor.name)
        if target is None:
            continue
        data, shape = _shard_data(tensor, shard.param_slice(target.param_name, target.shard))
        qtype = tensor.tensor_type
        projection = _is_projection(target)
        blocks = quantized_blocks(data, qtype, shape) if keep_blocks else None
        weight = None
        if blocks is None:
            weight = dequantize_tensor(data, qtype, shape, dtype, device)
            if keep_blocks:
                blocks = requantized_blocks(qtype, shape, weight)
        if permuted and target.shard in heads_of_shard:
            if weight is not None:
                weight = unpermute_qk(weight, heads_of_shard[target.shard])
            if blocks is not None:
                rows = unpermute_qk(torch.arange(shape[0]), heads_of_shard[target.shard])
                blocks = blocks.select_rows(rows)
        # Requantized blocks stand in for a projection only: an embedding keeps the file's values.
        yield target, blocks if blocks is not None and (projection or weight is None) else weight, blocks


def _shard_data(tensor: GGUFTensor, cut: tuple[int, int, int] | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """The file's data and shape of a tensor's rows or columns ``cut`` (dim, start, stop);
    a quantized matrix's columns split only on its blocks' boundaries."""
    if cut is None:
        return tensor.data, tensor.shape
    dim, start, stop = cut
    shape = list(tensor.shape)
    shape[dim] = stop - start
    block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    if dim == 0 or block == 1:  # rows, or a plain type's elements
        return np.ascontiguousarray(take(tensor.data, cut)), tuple(shape)
    if start % block or stop % block:
        raise ValueError(f"{tensor.name} ({tensor.tensor_type.name}, blocks of {block}) cannot be split across "
                         f"tensor-parallel ranks at columns {start}..{stop}: not on a block boundary; "
                         "use fewer ranks")
    return np.ascontiguousarray(tensor.data[:, start // block * type_size:stop // block * type_size]), tuple(shape)


def _is_projection(target: ParamTarget) -> bool:
    """A decoder projection or an untied LM head: a ``Linear`` weight the quantized
    kernels can take in full (not the embedding, which lookups read densely)."""
    return target.param_name.endswith("_proj.weight") or target.param_name == "lm_head.weight"


def _rope_freq_factors(file: GGUFFile) -> torch.Tensor | None:
    tensor = file.tensor(GGUF_ROPE_FREQS)
    if tensor is None:
        return None
    return dequantize_tensor(tensor.data, tensor.tensor_type, tensor.shape, torch.float32, "cpu")


_MISSING = object()


def _field(file: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    value = file.fields.get(key)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return default
    if isinstance(value, list):
        raise ValueError(f"GGUF metadata {key!r} varies per layer; not supported")
    return value


def _vocab_size(file: GGUFFile, arch: str) -> int:
    size = _field(file, f"{arch}.vocab_size", None)
    if size is not None:
        return int(size)
    embedding = file.tensor("token_embd.weight")
    if embedding is None:
        raise ValueError("GGUF file has neither a vocab_size nor a token_embd.weight")
    return embedding.shape[0]


def _rope_scaling(file: GGUFFile, arch: str) -> RopeScaling:
    # llama3 scaling reaches the model through the rope_freqs tensor instead.
    kind = _field(file, f"{arch}.rope.scaling.type", "none")
    legacy_factor = _field(file, f"{arch}.rope.scale_linear", None)
    if kind == "none" and legacy_factor is None:
        return RopeScaling()
    if kind in ("linear", "none"):
        factor = _field(file, f"{arch}.rope.scaling.factor", legacy_factor)
        return RopeScaling(kind="linear", factor=float(factor))
    raise ValueError(f"unsupported rope scaling {kind!r} in GGUF file (supported: none, linear)")


def _context_length(file: GGUFFile, arch: str) -> int:
    # No sliding-window attention: limit a windowed model to its window (see safetensors.py).
    length = int(_field(file, f"{arch}.context_length"))
    window = _field(file, f"{arch}.attention.sliding_window", None)
    return length if window is None else min(length, int(window))
