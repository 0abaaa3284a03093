"""A decode step's decoder layers as one native call (``decoder_stack``).

At batch 1 the default model's 30 layers are ~300 small native ops; issued one
by one from Python through ``nn.Module`` calls, the interpreter and the
dispatcher cost about as much as a quarter of the step. ``DecodeStack`` hands
the same weights to ``torch.ops.tokenloom.decoder_stack``, which runs the same
kernels back to back in C++ (``kernels/csrc/decoder_stack.cpp``), so the
result is the one the per-layer path computes.

It applies to what serving spends its time on: decode-only steps, every layer
projection quantized (and taking the step's batch size, see
``QuantizedWeight.handles``), a float32 or float16 KV cache. Every other step
(prefill chunks, mixed batches) takes the per-layer path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenloom import kernels
from tokenloom.model.layers.quantization import MAX_INT8_ACTIVATION_ROWS, QuantizedWeight

if TYPE_CHECKING:
    from tokenloom.model.layers.attention import AttentionMetadata
    from tokenloom.model.layers.rotary import RopeInputs
    from tokenloom.model.llama import KVCache, LlamaModel

_CACHE_DTYPES = (torch.float32, torch.float16)


@dataclass(frozen=True, slots=True)
class DecodeStack:
    norms: list[torch.Tensor]  # per layer: input norm, post-attention norm; then the final norm
    qweights: list[torch.Tensor]  # per layer: qkv, o, gate_up, down
    scales: list[torch.Tensor]
    mins: list[torch.Tensor | None]
    tiles: list[torch.Tensor | None]  # GemmTiles, where a projection has them
    tile_scales: list[torch.Tensor | None]
    tile_mins: list[torch.Tensor | None]
    qkv_biases: list[torch.Tensor | None]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    int8_activations: bool
    projections: list[QuantizedWeight]

    @classmethod
    def build(cls, model: LlamaModel) -> DecodeStack | None:
        """The stack over ``model``'s current weights, or None where it does not apply
        (a projection without a quantized copy, projections that disagree on int8
        activations, a head size the attention kernel lacks)."""
        first = model.layers[0].self_attn
        if first.head_dim % 8 or not kernels.available():
            return None
        norms, quantized, biases = [], [], []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            quantized += [p.quantized for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            biases.append(attn.qkv_proj.bias)
        if any(q is None for q in quantized) or len({q.int8_activations for q in quantized}) > 1:
            return None
        norms.append(model.norm.weight)
        gemm = [q.gemm for q in quantized]
        return cls(norms, [q.qweight for q in quantized], [q.scales for q in quantized],
                   [q.mins for q in quantized], [None if g is None else g.tiles for g in gemm],
                   [None if g is None else g.scales for g in gemm], [None if g is None else g.mins for g in gemm],
                   biases, first.num_heads, first.num_kv_heads, first.head_dim, model.norm.eps, first.scale,
                   quantized[0].int8_activations, quantized)

    def applies(self, num_tokens: int, kv_caches: list[KVCache], meta: AttentionMetadata) -> bool:
        return (meta.is_decode_only and kv_caches[0][0].dtype in _CACHE_DTYPES
                and all(q.handles(num_tokens) for q in self.projections))

    def __call__(self, hidden: torch.Tensor, rope: RopeInputs, kv_caches: list[KVCache],
                 meta: AttentionMetadata) -> torch.Tensor:
        """Embeddings [n, hidden] -> the final norm's output [n, hidden]; writes K/V."""
        int8 = self.int8_activations and hidden.shape[0] <= MAX_INT8_ACTIVATION_ROWS
        return kernels.ops().decoder_stack(
            hidden, self.norms, self.qweights, self.scales, self.mins, self.tiles, self.tile_scales,
            self.tile_mins, self.qkv_biases,
            [k for k, _ in kv_caches], [v for _, v in kv_caches], rope.cos_sin_cache, rope.positions,
            meta.slot_mapping, meta.block_tables, meta.seq_lens, self.num_heads, self.num_kv_heads,
            self.head_dim, self.eps, self.scale, int8)
