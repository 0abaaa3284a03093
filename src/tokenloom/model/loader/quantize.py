"""Give each linear layer (and the LM head) its quantized copy after loading.

``--quantization`` modes:

    auto  (default) every weight a GGUF stores as Q4_0 / Q4_1 / Q8_0 / Q4_K /
          Q6_K runs on the quantized kernels with exactly those weights; other
          quantized types (Q5_0, Q5_K, ...) run requantized to int8; float
          weights, and every weight of a float checkpoint, stay dense f32.
    none  dense f32 everywhere: the exact path, matched against transformers.
    int8  every projection in int8 blocks (the file's own Q8_0 blocks where it
          has them, otherwise quantized from the f32 weight at load).
    int4  every decoder projection in 4-bit blocks (the file's own Q4_0/Q4_1/Q4_K
          blocks where it has them, otherwise quantized at load); the LM head
          keeps the file's own blocks or else goes to int8, because 4-bit
          logits cost quality out of proportion to their share of the bytes.

Every quantized weight, decoder projection or LM head, gets the tiles of the
batched int x int8 GEMM (see ``layers/quantization.py``): its activations are
quantized to int8 per block of 32 at every batch size, prefill included, as
llama.cpp does. Since the tiles take every batch, the projections drop their
dense f32 weight; the LM head's dense weight stays (it is the embedding table
when tied).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from tokenloom import kernels
from tokenloom.config import QUANTIZATION_MODES
from tokenloom.model.layers.linear import Linear, MergedLinear
from tokenloom.model.layers.quantization import FORMATS, QuantizedWeight, concat_rows, quantize
from tokenloom.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# mode -> (kinds of the file's own blocks used as they are, kind to quantize the rest to)
_EVERY_KIND = tuple(FORMATS)
_LAYER_POLICY = {"auto": (_EVERY_KIND, None), "int8": (("int8",), "int8"), "int4": (("int4", "q4_k"), "int4")}
_HEAD_POLICY = {"auto": (_EVERY_KIND, None), "int8": (("int8",), "int8"), "int4": (_EVERY_KIND, "int8")}
PackedParts = dict[tuple[str, str | None], QuantizedWeight]  # (param name, shard) -> blocks


def apply_quantization(model: LlamaForCausalLM, mode: str, packed: PackedParts) -> Counter[str]:
    """Attach quantized weights per ``mode``; returns how many matrices got each kind."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {mode!r}")
    kinds: Counter[str] = Counter()
    if mode == "none" or not _kernels_usable(model, mode, packed):
        return kinds
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module is not model.lm_head:
            parts = list(module.output_sizes) if isinstance(module, MergedLinear) else [None]
            blocks = [packed.get((f"{name}.weight", p)) for p in parts]
            chosen = _choose(module.weight, blocks, *_LAYER_POLICY[mode])
            module.quantized = None if chosen is None else chosen.with_gemm_tiles()
            if module.quantized is not None:
                module.release_dense_weight()  # never read again: saves 4 bytes per weight
            kinds[_kind(module.quantized)] += 1
    head_name = "model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight"
    head = _choose(model.logits_weight(), [packed.get((head_name, None))], *_HEAD_POLICY[mode])
    model.logits_quantized = None if head is None else head.with_gemm_tiles()
    kinds[_kind(model.logits_quantized)] += 1
    logger.info("weights: %s; quantized GEMMs on %s", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                kernels.gemm_isa())
    return kinds


def _choose(dense: torch.Tensor, parts: list[QuantizedWeight | None], accept: tuple[str, ...],
            fallback: str | None) -> QuantizedWeight | None:
    """The file's own blocks when every part has them in an ``accept``ed kind,
    else ``dense`` quantized to ``fallback`` (None: stay dense)."""
    kinds = {p.kind if p is not None else None for p in parts}
    if len(kinds) == 1 and kinds <= set(accept):
        return parts[0] if len(parts) == 1 else concat_rows(parts)
    if None not in kinds and len(kinds) > 1 and kinds <= set(accept) and "int8" in accept:
        # A merged projection whose parts differ (Q4_K_M's q/k in Q4_K, v in Q6_K):
        # one matmul needs one kind, and int8 holds the other parts' values closely.
        return concat_rows([p if p.kind == "int8" else quantize(p.dequantize(), "int8") for p in parts])
    return None if fallback is None else quantize(dense, fallback)


def _kernels_usable(model: LlamaForCausalLM, mode: str, packed: PackedParts) -> bool:
    """Explicit modes fail loudly where the kernels cannot run; auto falls back to dense."""
    param = model.logits_weight()
    reason = None
    if param.device.type != "cpu":
        reason = f"the quantized kernels run on the CPU only (model is on {param.device})"
    elif param.dtype != torch.float32:
        reason = f"the quantized kernels compute in float32 (dtype is {param.dtype})"
    if mode == "auto":
        return reason is None and bool(packed) and kernels.available()
    if reason is not None:
        raise ValueError(f"--quantization {mode}: {reason}")
    kernels.ops()  # raises KernelsUnavailable with the reason
    return True


def _kind(weight: QuantizedWeight | None) -> str:
    return "dense" if weight is None else weight.kind
