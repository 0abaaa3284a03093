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
dense f32 weight, and so does an untied LM head. GGUF projections with blocks the
kernels take never get a dense copy at all (``load_weights``), unless they end up
dense; nor does a GGUF embedding stored in such blocks, whose lookups then read
its rows from the blocks (``VocabEmbedding.use_blocks``). The tiles hold the same
bytes as the blocks they are built from, so the blocks are dropped too
(``QuantizedWeight.without_blocks``), except a tied head's, which the embedding
reads: each weight is held once. A 1B Q4_K_M model went from 1.70 GiB of weights
in memory (2.70 GiB resident) to 0.74 GiB (1.3 GiB resident); the file is 0.62 GiB.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Set

import torch

from tokenloom import kernels
from tokenloom.config import QUANTIZATION_MODES
from tokenloom.model.layers.embedding import VocabEmbedding
from tokenloom.model.layers.linear import Linear, MergedLinear
from tokenloom.model.layers.quantization import FORMATS, QuantizedWeight, StackedWeight, quantize, stack_rows
from tokenloom.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# mode -> (kinds of the file's own blocks used as they are, kind to quantize the rest to)
_EVERY_KIND = tuple(FORMATS)
_LAYER_POLICY = {"auto": (_EVERY_KIND, None), "int8": (("int8",), "int8"), "int4": (("int4", "q4_k"), "int4")}
_HEAD_POLICY = {"auto": (_EVERY_KIND, None), "int8": (("int8",), "int8"), "int4": (_EVERY_KIND, "int8")}
PackedParts = dict[tuple[str, str | None], QuantizedWeight]  # (param name, shard) -> blocks
_EMBEDDING = ("model.embed_tokens.weight", None)


def apply_quantization(model: LlamaForCausalLM, mode: str, packed: PackedParts,
                       deferred: Set[tuple[str, str | None]] = frozenset()) -> Counter[str]:
    """Attach quantized weights per ``mode``; returns how many matrices got each kind.
    ``deferred``: the (parameter, part) slots the loader left unfilled because
    ``packed`` holds their blocks; a layer that does not run on those blocks gets
    them dequantized into its dense weight first. ``packed`` is consumed: each layer's
    blocks leave it once the layer has its tiles, so they are freed as loading goes."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {mode!r}")
    kinds: Counter[str] = Counter()
    usable = mode != "none" and _kernels_usable(model, mode, packed)
    deferred = set(deferred)  # what is still unfilled: ``_filled`` takes slots out
    head = model.lm_head
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module is head:
            continue
        parts = list(module.output_sizes) if isinstance(module, MergedLinear) else [None]
        slots = [(f"{name}.weight", p) for p in parts]
        dense = lambda: _filled(module, slots, packed, deferred)  # noqa: E731
        chosen = _choose(dense, [packed.get(s) for s in slots], *_LAYER_POLICY[mode]) if usable else None
        if chosen is None:
            dense()
        module.quantized = None if chosen is None else chosen.with_gemm_tiles().without_blocks()
        if module.quantized is not None:
            module.release_dense_weight()  # never read again: saves 4 bytes per weight
        for slot in slots:  # the layer's blocks are in its tiles (or its dense weight) now
            packed.pop(slot, None)
        kinds[_kind(module.quantized)] += 1
    head_slot = ("model.embed_tokens.weight" if head is None else "lm_head.weight", None)
    embedding = model.model.embed_tokens
    head_dense = lambda: _filled(embedding if head is None else head, [head_slot], packed, deferred)  # noqa: E731
    quantized = _choose(head_dense, [packed.get(head_slot)], *_HEAD_POLICY[mode]) if usable else None
    if quantized is None:
        head_dense()
    model.logits_quantized = None if quantized is None else quantized.with_gemm_tiles()
    if head is not None and model.logits_quantized is not None:
        head.quantized = model.logits_quantized
        head.release_dense_weight()  # an untied head's dense copy is never read again either
    kinds[_kind(model.logits_quantized)] += 1
    lookups_in_blocks = _EMBEDDING in deferred  # no dense table was needed: lookups read the file's blocks
    if lookups_in_blocks:
        embedding.use_blocks(packed[_EMBEDDING])
    if model.logits_quantized is not None and not (head is None and lookups_in_blocks):
        # Only the head's GEMM reads these blocks (a tied head's are the embedding's rows): tiles suffice.
        model.logits_quantized = model.logits_quantized.without_blocks()
        if head is not None:
            head.quantized = model.logits_quantized
    if usable:
        logger.info("weights: %s; quantized GEMMs on %s", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                    kernels.gemm_isa())
    return kinds


def _filled(module: Linear | VocabEmbedding, slots: list[tuple[str, str | None]], packed: PackedParts,
            deferred: set[tuple[str, str | None]]) -> torch.Tensor:
    """``module``'s dense weight, its deferred parts dequantized into it first (and no
    longer deferred)."""
    for slot in slots:
        if slot in deferred:
            rows = module.shard_rows(slot[1]) if slot[1] is not None else slice(None)
            with torch.inference_mode():
                module.weight.data[rows].copy_(packed[slot].dequantize())
            deferred.discard(slot)
    return module.weight


def _choose(dense: Callable[[], torch.Tensor], parts: list[QuantizedWeight | None], accept: tuple[str, ...],
            fallback: str | None) -> QuantizedWeight | StackedWeight | None:
    """The file's own blocks when every part has them in an ``accept``ed kind (parts of
    different kinds run side by side: ``stack_rows``), else the dense weight
    quantized to ``fallback`` (None: stay dense)."""
    kinds = {p.kind if p is not None else None for p in parts}
    if kinds <= set(accept):
        return stack_rows(parts)
    return None if fallback is None else quantize(dense(), fallback)


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


def _kind(weight: QuantizedWeight | StackedWeight | None) -> str:
    return "dense" if weight is None else weight.kind
