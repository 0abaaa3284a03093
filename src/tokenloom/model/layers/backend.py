"""The kernels a layer calls, one implementation per device family, chosen once.

::

    TorchOps      plain PyTorch, any device: the reference every other backend is tested against
    CpuNativeOps  the C++ kernels (kernels/csrc), float32 on the CPU
    TritonOps     the Triton kernels (kernels/triton), on CUDA

The model holds one of them (``LlamaForCausalLM.use_ops``) and every layer
calls through it: the norms, rotary, SwiGLU, the KV write and paged attention.
A backend that cannot serve a case (a cache dtype or head size its kernel
lacks) hands that call to the reference, so each is complete.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from tokenloom import kernels
from tokenloom.model.layers import attention
from tokenloom.model.layers.attention import AttentionMetadata
from tokenloom.model.layers.rotary import RopeInputs, apply_rotary

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "native", "triton")
BACKEND_ENV = "TOKENLOOM_ATTENTION_BACKEND"  # overrides "auto", as vLLM's VLLM_ATTENTION_BACKEND does


class TorchOps:
    """The reference: plain PyTorch ops, any device and dtype."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Statistic in float32; the normalized activations are cast back to the input
        dtype *before* the weight multiply, as the reference implementations do, so
        bf16 results match them bit for bit."""
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        total = residual + x
        return self.rms_norm(total, weight, eps), total

    def rotary_qk(self, qkv: torch.Tensor, rope: RopeInputs, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv [n, (H + 2 KVH) * D] -> rotated q [n, H, D], k [n, KVH, D]."""
        n = qkv.shape[0]
        q, k = qkv[:, :num_heads * head_dim], qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim]
        cos, sin = rope.cos_sin()
        return (apply_rotary(q.view(n, num_heads, head_dim), cos, sin),
                apply_rotary(k.view(n, num_kv_heads, head_dim), cos, sin))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        attention.write_kv(k_cache, v_cache, k, v, slot_mapping)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return attention.paged_attention(q, k_cache, v_cache, meta, scale)


class CpuNativeOps(TorchOps):
    """The C++ kernels: float32 activations on the CPU (the decoder-stack path too)."""

    name = "native"

    def rms_norm(self, x, weight, eps):
        return kernels.ops().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return kernels.ops().add_rms_norm(x, residual, weight, eps)

    def rotary_qk(self, qkv, rope, num_heads, num_kv_heads, head_dim):
        return kernels.ops().rotary_qk(qkv, rope.cos_sin_cache, rope.positions, num_heads, num_kv_heads, head_dim)

    def silu_and_mul(self, x):
        return kernels.ops().silu_and_mul(x)

    def write_kv(self, k_cache, v_cache, k, v, slot_mapping):
        attention.write_kv(k_cache, v_cache, k, v, slot_mapping, native=True)

    def attention(self, q, k_cache, v_cache, meta, scale):
        return attention.paged_attention(q, k_cache, v_cache, meta, scale, native=True)


class TritonOps(TorchOps):
    """The Triton kernels on CUDA (or anywhere under ``TRITON_INTERPRET=1``).

    Paged attention takes float caches with blocks of 16 or more tokens (an int8
    cache goes to the reference). Split-KV is used for decode-only steps whose
    KV-head programs would not fill the GPU, once a context spans two segments.
    """

    name = "triton"

    def __init__(self, num_sms: int = 132) -> None:
        from tokenloom.kernels.triton import attention as triton_attention
        from tokenloom.kernels.triton import fused_ops, kv_write

        self._attention, self._fused, self._kv = triton_attention, fused_ops, kv_write
        self.num_sms = num_sms

    def rms_norm(self, x, weight, eps):
        return self._fused.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self._fused.add_rms_norm(x, residual, weight, eps)

    def rotary_qk(self, qkv, rope, num_heads, num_kv_heads, head_dim):
        return self._fused.rotary_qk(qkv, rope.cos_sin_cache, rope.positions, num_heads, num_kv_heads, head_dim)

    def silu_and_mul(self, x):
        return self._fused.silu_and_mul(x)

    def write_kv(self, k_cache, v_cache, k, v, slot_mapping):
        if k_cache.dtype == torch.int8:
            return super().write_kv(k_cache, v_cache, k, v, slot_mapping)
        self._kv.write_kv(k_cache, v_cache, k, v, slot_mapping)

    def attention(self, q, k_cache, v_cache, meta, scale):
        if k_cache.dtype == torch.int8 or k_cache.shape[1] < 16 or meta.query_start_loc_tensor is None:
            return super().attention(q, k_cache, v_cache, meta, scale)
        num_kv_heads = k_cache.shape[2]
        split = meta.is_decode_only and meta.num_seqs * num_kv_heads < 2 * self.num_sms
        return self._attention.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc_tensor, scale,
            max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, split=split)


def select_ops(device: torch.device, dtype: torch.dtype, choice: str = "auto") -> TorchOps:
    """The backend for a model on ``device`` computing in ``dtype``; ``choice`` (or
    $TOKENLOOM_ATTENTION_BACKEND) forces one."""
    choice = os.environ.get(BACKEND_ENV, choice) if choice == "auto" else choice
    if choice not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        if device.type == "cuda":
            choice = "triton"
        elif device.type == "cpu" and dtype == torch.float32 and kernels.available():
            choice = "native"
        else:
            choice = "torch"
    if choice == "native":
        if device.type != "cpu" or dtype != torch.float32 or not kernels.available():
            raise ValueError("the native backend needs float32 on the CPU with the kernels built")
        return CpuNativeOps()
    if choice == "triton":
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        return TritonOps(sms)
    return TorchOps()
