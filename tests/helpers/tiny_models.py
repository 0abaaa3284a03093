"""Tiny random Llama-family models, saved the way HF and llama.cpp save real ones.

``make_tiny_model(kind)`` builds a seeded random transformers model;
``save_hf_model`` writes it as an HF directory (config.json + safetensors) and
``write_gguf`` as a GGUF file with llama.cpp's tensor names, metadata keys and
q/k row permutation. Both take an optional ``tokenizers.Tokenizer`` (see
``tests.helpers.tiny_tokenizer``) so that engine tests get complete models.
``quantization_roundtrip`` gives the HF model whose weights are exactly what a
quantized GGUF file holds, the reference for quantized loading.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedModel

QType = gguf.GGMLQuantizationType
TINY_KINDS = ("llama3", "qwen2", "mistral", "smollm")
VOCAB_SIZE = 512
_SHAPE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
_GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
              "Qwen2ForCausalLM": "qwen2"}  # llama.cpp writes Mistral as "llama"


def tiny_config(kind: str) -> PretrainedConfig:
    """The transformers config of a tiny model of ``kind`` (one of TINY_KINDS)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if kind == "llama3":
        # original_max_position_embeddings is small so that the llama3 rule keeps
        # some frequencies, divides others and interpolates one (head_dim 16).
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}
        return LlamaConfig(**_SHAPE, num_hidden_layers=2, rope_parameters=rope)
    if kind == "qwen2":
        rope = {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}
        return Qwen2Config(**_SHAPE, num_hidden_layers=2, rope_parameters=rope)
    if kind == "mistral":
        # head_dim 32 with 4 heads: q/o projections are wider than hidden_size.
        return MistralConfig(**_SHAPE, num_hidden_layers=2, head_dim=32, sliding_window=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if kind == "smollm":
        shape = {**_SHAPE, "num_key_value_heads": 1}
        return LlamaConfig(**shape, num_hidden_layers=3, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {TINY_KINDS}")


def make_tiny_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A random float32 model of ``kind``; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager",
                                             dtype=torch.float32)
    return model.eval()


def save_hf_model(model: PreTrainedModel, directory: str | Path,
                  tokenizer: Tokenizer | None = None, chat_template: str | None = None) -> Path:
    """config.json + model.safetensors (and the tokenizer files if given)."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        from tests.helpers.tiny_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(directory, tokenizer, chat_template)
    return directory


def write_gguf(model: PreTrainedModel, path: str | Path, tensor_type: QType = QType.F32,
               tokenizer: Tokenizer | None = None, chat_template: str | None = None) -> Path:
    """``model`` as llama.cpp's convert_hf_to_gguf would write it: 2-D weights in
    ``tensor_type``, norms and biases in F32, q/k rows permuted for "llama"."""
    path = Path(path)
    config = model.config
    arch = _GGUF_ARCH[config.architectures[0]]
    writer = gguf.GGUFWriter(path, arch)
    _write_metadata(writer, config, tensor_type)
    if tokenizer is None:
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_id)
    else:
        from tests.helpers.tiny_tokenizer import write_gguf_tokenizer_metadata

        write_gguf_tokenizer_metadata(writer, tokenizer, chat_template)
    for name, array in _gguf_tensors(model, arch):
        _add_tensor(writer, name, array, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantization_roundtrip(model: PreTrainedModel, tensor_type: QType) -> PreTrainedModel:
    """A copy of ``model`` whose 2-D weights went through ``tensor_type`` and back."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for param in reference.parameters():
            if param.dim() == 2:
                data = param.numpy()
                restored = gguf.quants.dequantize(gguf.quants.quantize(data, tensor_type),
                                                  tensor_type)
                param.copy_(torch.from_numpy(restored.reshape(data.shape)))
    return reference


def _write_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig, tensor_type: QType) -> None:
    head_dim = _head_dim(config)
    writer.add_name("tiny-" + config.model_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.rope_parameters["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])
    file_type = "ALL_F32" if tensor_type == QType.F32 else f"MOSTLY_{tensor_type.name}"
    writer.add_file_type(gguf.LlamaFileType[_K_FILE_TYPES.get(file_type, file_type)])


_K_FILE_TYPES = {"MOSTLY_Q4_K": "MOSTLY_Q4_K_M"}  # the file type names a K-quant mix


def _gguf_tensors(model: PreTrainedModel, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) pairs in llama.cpp's naming and row layout."""
    config = model.config
    state = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    if config.rope_parameters["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(config)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf_name, gguf_name in _LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                array = state.get(f"{prefix}{hf_name}.{kind}")
                if array is None:
                    continue
                if arch == "llama" and gguf_name in ("attn_q", "attn_k"):
                    heads = (config.num_attention_heads if gguf_name == "attn_q"
                             else config.num_key_value_heads)
                    array = _permute_qk(array, heads)
                yield f"blk.{i}.{gguf_name}.{kind}", array
    yield "output_norm.weight", state["model.norm.weight"]
    if not config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]


_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute_qk(array: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's halves become interleaved pairs."""
    rows = array.shape[0]
    return (array.reshape(num_heads, 2, rows // num_heads // 2, *array.shape[1:])
            .swapaxes(1, 2).reshape(array.shape))


def _llama3_rope_factors(config: PretrainedConfig) -> np.ndarray:
    """Per-frequency divisors as llama.cpp writes them for llama3 rope scaling."""
    rope = config.rope_parameters
    base, factor = rope["rope_theta"], rope["factor"]
    head_dim = _head_dim(config)
    old_len = rope["original_max_position_embeddings"]
    low_wavelen = old_len / rope["low_freq_factor"]
    high_wavelen = old_len / rope["high_freq_factor"]
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, tensor_type: QType) -> None:
    if array.ndim == 1 or tensor_type == QType.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif tensor_type == QType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# llama.cpp's Q4_K_M mix, simplified to every layer: 6-bit K-quants for the LM head,
# attn_v and ffn_down, 4-bit K-quants for the other matrices (token_embd included).
Q4_K_M_TYPES = {"output": QType.Q6_K, "attn_v": QType.Q6_K, "ffn_down": QType.Q6_K}
# Where each K-quant keeps its f16 super-block scale(s), and a range that gives weights of ~0.05.
_KQUANT_SCALES = {QType.Q4_K: ((0, 2), 6e-5), QType.Q5_K: ((0, 2), 3e-5), QType.Q6_K: ((208,), 1.5e-5)}


def write_random_kquant_gguf(path: str | Path, seed: int = 0, default: QType = QType.Q4_K,
                             types: dict[str, QType] | None = None, tokenizer: Tokenizer | None = None) -> Path:
    """A Llama (hidden 256: K-quant super-blocks hold 256 weights) whose matrices are random
    K-quant blocks, ``types`` by tensor kind (default ``Q4_K_M_TYPES``), else ``default``.
    gguf can read K-quants but not write them, so the blocks are random bytes with sane
    f16 scales; the model is as random as the other tiny ones, and the dense reference
    is the file itself, dequantized. ``tokenizer``: written into the file, as write_gguf does."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    types = Q4_K_M_TYPES if types is None else types
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(Path(path), "llama")
    _write_metadata(writer, config, default)
    if tokenizer is None:
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_id)
    else:
        from tests.helpers.tiny_tokenizer import write_gguf_tokenizer_metadata

        write_gguf_tokenizer_metadata(writer, tokenizer, None)
    for name, array in _gguf_tensors(model, "llama"):
        if array.ndim == 1:
            writer.add_tensor(name, array.astype(np.float32))
            continue
        qtype = types.get(name.split(".")[-2], default)
        writer.add_tensor(name, random_kquant(rng, array.shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def random_kquant(rng: np.random.Generator, shape: tuple[int, int], qtype: QType) -> np.ndarray:
    """Random K-quant blocks of an [n, k] matrix (random bytes, sane f16 scales), as GGUF stores them."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = rng.integers(0, 256, size=(n, k // block_size, type_size), dtype=np.uint8)
    offsets, scale = _KQUANT_SCALES[qtype]
    for offset in offsets:
        d = rng.uniform(0.5 * scale, scale, size=(n, k // block_size)).astype(np.float16)
        raw[..., offset:offset + 2] = d[..., None].view(np.uint8).reshape(n, k // block_size, 2)
    return raw.reshape(n, -1)
