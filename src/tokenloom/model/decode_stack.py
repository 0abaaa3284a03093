"""A step's decoder layers as one native call (``decoder_stack``).

At batch 1 the default model's 30 layers are ~300 small native ops; issued one
by one from Python through ``nn.Module`` calls, the interpreter and the
dispatcher cost about as much as a quarter of the step. ``DecodeStack`` hands
the same weights to ``torch.ops.tokenloom.decoder_stack``, which runs the same
kernels back to back in C++ (``kernels/csrc/decoder_stack.cpp``), so the
result is the one the per-layer path computes.

It applies to every step (decodes, speculative decoding's verify steps of a few
tokens per sequence, prompt chunks: one paged attention kernel serves them all)
when every layer projection is quantized (with its GEMM tiles) and the KV cache is
float32, float16 or int8; otherwise the per-layer path runs. A verify step of 6
rows took 11.3 ms on the per-layer path and 9.5 ms here (default model, 2 threads);
a 256-token prefill 175 and 169 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenloom import kernels
from tokenloom.model.layers.attention import NATIVE_CACHE_DTYPES, query_start_loc
from tokenloom.model.layers.quantization import FORMATS, StackedWeight

if TYPE_CHECKING:
    from tokenloom.model.layers.attention import AttentionMetadata
    from tokenloom.model.layers.rotary import RopeInputs
    from tokenloom.model.llama import KVCache, LlamaModel

@dataclass(frozen=True, slots=True)
class DecodeStack:
    norms: list[torch.Tensor]  # per layer: input norm, post-attention norm; then the final norm
    parts_per_linear: list[int]  # per layer: qkv, o, gate_up, down (a StackedWeight has several)
    formats: list[int]  # per part (FORMATS)
    weights: list[torch.Tensor | None]  # their GemmTiles.tensors(), one after the other
    out_features: list[int]  # per part
    qkv_biases: list[torch.Tensor | None]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float

    @classmethod
    def build(cls, model: LlamaModel) -> DecodeStack | None:
        """The stack over ``model``'s current weights, or None where it does not apply
        (a projection without a quantized copy, a head size the attention kernel lacks)."""
        first = model.layers[0].self_attn
        if first.head_dim % 8 or not kernels.available():
            return None
        norms, quantized, biases = [], [], []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            quantized += [p.quantized for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            biases.append(attn.qkv_proj.bias)
        if any(q is None or q.gemm is None for q in quantized):
            return None
        norms.append(model.norm.weight)
        parts = [q.parts if isinstance(q, StackedWeight) else (q,) for q in quantized]
        flat = [p for linear in parts for p in linear]
        return cls(norms, [len(linear) for linear in parts], [FORMATS[p.kind] for p in flat],
                   [t for p in flat for t in p.gemm.tensors()], [p.shape[0] for p in flat], biases,
                   first.num_heads, first.num_kv_heads, first.head_dim, model.norm.eps, first.scale)

    def applies(self, kv_caches: list[KVCache]) -> bool:
        return kv_caches[0][0].dtype in NATIVE_CACHE_DTYPES

    def __call__(self, hidden: torch.Tensor, rope: RopeInputs, kv_caches: list[KVCache],
                 meta: AttentionMetadata) -> torch.Tensor:
        """Embeddings [n, hidden] -> the final norm's output [n, hidden]; writes K/V."""
        return kernels.ops().decoder_stack(
            hidden, self.norms, self.parts_per_linear, self.formats, self.weights, self.out_features,
            self.qkv_biases, [k for k, _ in kv_caches], [v for _, v in kv_caches], rope.cos_sin_cache,
            rope.positions, meta.slot_mapping, meta.block_tables, meta.seq_lens, query_start_loc(meta), self.num_heads,
            self.num_kv_heads, self.head_dim, self.eps, self.scale)
