"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as one network.

The variants differ only in configuration: q/k/v bias (Qwen2), tied
embeddings (SmolLM, small Qwen2), rope scaling (Llama 3.1) and the head counts
of grouped-query attention. One flat batch of tokens goes through per step::

    input_ids [num_tokens] -> embed -> N x (attention + MLP) -> norm -> hidden [num_tokens, hidden]

The model knows nothing about requests: the runner hands it the token ids,
their positions, the per-layer paged KV caches and an ``AttentionMetadata``.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenloom.config import ModelArchConfig
from tokenloom.model.decode_stack import DecodeStack
from tokenloom.model.layers.attention import AttentionMetadata
from tokenloom.model.layers.backend import CpuNativeOps, TorchOps
from tokenloom.model.layers.embedding import VocabEmbedding
from tokenloom.model.layers.linear import Linear, MergedLinear, apply_linear
from tokenloom.model.layers.norm import RMSNorm
from tokenloom.model.layers.quantization import QuantizedWeight
from tokenloom.model.layers.rotary import RopeInputs, RotaryEmbedding
from tokenloom.parallel.group import SINGLE, TPGroup
from tokenloom.parallel.layout import TPShard, tp_shard

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    """Grouped-query self-attention over the paged KV cache: this rank's heads
    (``shard``), their partial o_proj products summed over the ranks."""

    def __init__(self, config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                 shard: TPShard, group: TPGroup) -> None:
        super().__init__()
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.group = group
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size},
                                     config.attention_bias, dtype, device)
        self.o_proj = Linear(q_size, config.hidden_size, False, dtype, device)
        self.ops = TorchOps()  # replaced by LlamaForCausalLM.use_ops

    def forward(self, hidden: torch.Tensor, rope: RopeInputs, kv_cache: KVCache,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [num_tokens, (H + 2 KVH) * D]
        v = qkv[:, -self.num_kv_heads * self.head_dim:].view(num_tokens, self.num_kv_heads, self.head_dim)
        # rotated straight out of qkv into new q [n, H, D], k [n, KVH, D]
        q, k = self.ops.rotary_qk(qkv, rope, self.num_heads, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        self.ops.write_kv(k_cache, v_cache, k, v, attn_metadata.slot_mapping)
        out = self.ops.attention(q, k_cache, v_cache, attn_metadata, self.scale)  # [n, H, D]
        return self.group.all_reduce(self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim)))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with gate/up fused; this
    rank's intermediate rows (``shard``), their partial down products summed over the ranks."""

    def __init__(self, config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                 shard: TPShard, group: TPGroup) -> None:
        super().__init__()
        size = shard.intermediate_size
        self.group = group
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size}, False,
                                         dtype, device)
        self.down_proj = Linear(size, config.hidden_size, False, dtype, device)
        self.ops = TorchOps()  # replaced by LlamaForCausalLM.use_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        return self.group.all_reduce(self.down_proj(self.ops.silu_and_mul(gate_up)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``.

    The last residual add is left to the next layer's (or the final) norm,
    which fuses it: ``forward`` takes and returns ``(delta, residual)`` with
    the block's output being ``residual + delta``.
    """

    def __init__(self, config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                 shard: TPShard, group: TPGroup) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.self_attn = LlamaAttention(config, dtype, device, shard, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device, shard, group)

    def forward(self, delta: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs,
                kv_cache: KVCache, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: the embeddings are the residual stream
            residual, normed = delta, self.input_layernorm(delta)
        else:
            normed, residual = self.input_layernorm.add_forward(delta, residual)
        attn_out = self.self_attn(normed, rope, kv_cache, attn_metadata)
        normed, residual = self.post_attention_layernorm.add_forward(attn_out, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (no LM head)."""

    def __init__(self, config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                 rope_freq_factors: torch.Tensor | None, shard: TPShard, group: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(shard.vocab_size, config.hidden_size, dtype, device,
                                           shard.vocab[0], group)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, dtype, device, shard, group)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling, dtype, device,
                                          freq_factors=rope_freq_factors)
        self.decode_stack: DecodeStack | None = None  # set by use_ops, where it applies

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], attn_metadata: AttentionMetadata) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        rope = self.rotary_emb.inputs(positions)  # shared by every layer
        delta, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden_size]
        stack = self.decode_stack
        if stack is not None and stack.applies(kv_caches):
            return stack(delta, rope, kv_caches, attn_metadata)
        for layer, kv_cache in zip(self.layers, kv_caches):
            delta, residual = layer(delta, residual, rope, kv_cache, attn_metadata)
        return self.norm.add_forward(delta, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache.

    ``forward(input_ids [n], positions [n], kv_caches, attn_metadata) -> hidden [n, hidden_size]``
    writes the new tokens' K/V into ``kv_caches`` (one ``(k_cache, v_cache)``
    per layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``) and
    attends over each sequence's cached context. ``compute_logits`` turns
    selected hidden rows into float32 logits. Parameters are allocated
    uninitialized in ``dtype`` on ``device``; a loader fills them.
    ``rope_freq_factors`` carries a GGUF ``rope_freqs.weight`` tensor.

    With tensor parallelism (``group``'s ranks) the model holds this rank's part of
    every layer (``shard``, see ``parallel/layout.py``), runs in lockstep with the other
    ranks and ``compute_logits`` gives the full logits on rank 0.
    """

    def __init__(self, config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                 rope_freq_factors: torch.Tensor | None = None, group: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.shard = tp_shard(config, group.size, group.rank)
        self.group = group
        self._vocab_widths = tuple(tp_shard(config, group.size, r).vocab_size for r in range(group.size))
        self.model = LlamaModel(config, dtype, device, rope_freq_factors, self.shard, group)
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(config.hidden_size, self.shard.vocab_size, False, dtype, device))
        # The LM head's quantized copy (of the embedding when tied); set after loading.
        self.logits_quantized: QuantizedWeight | None = None
        self.ops = TorchOps()  # the layers' backend: use_ops

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden_size] -> logits [n, vocab_size] float32 (on rank 0 of several:
        the other ranks get their own vocabulary columns)."""
        weight = self.logits_weight()
        logits = apply_linear(hidden, weight, None, self.logits_quantized).float()
        if self.group.size == 1:
            return logits
        return self.group.gather_logits(logits, self._vocab_widths)

    def use_ops(self, ops: TorchOps) -> None:
        """Route every layer through ``ops`` (``layers/backend.py``); with the native
        CPU kernels, steps also take the native decoder stack where every layer is
        quantized. Call it after the quantized copies are attached (the
        loader does)."""
        self.ops = ops
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        # The native stack runs every layer in one call: no room for the ranks' all-reduces.
        native = isinstance(ops, CpuNativeOps) and self.group.size == 1
        self.model.decode_stack = DecodeStack.build(self.model) if native else None

    def logits_weight(self) -> torch.Tensor:
        """The dense [vocab_size, hidden_size] LM head (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
