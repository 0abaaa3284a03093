"""Copy checkpoint tensors into a model's parameters, part by part, and check
that every parameter (every part of a fused one) was filled exactly once.

A checkpoint may give a projection's part as its quantized blocks instead of a
dense tensor: the part then counts as filled but nothing is copied (no dense
copy of a quantized file's weights is made); ``apply_quantization`` either
runs the layer on those blocks or dequantizes them into the parameter."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tokenloom.model.layers.linear import MergedLinear
from tokenloom.model.layers.quantization import QuantizedWeight
from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.loader.names import ParamTarget

_Slot = tuple[str, str | None]  # (parameter name, part of a fused projection)


@torch.inference_mode()
def load_weights(model: LlamaForCausalLM,
                 weights: Iterable[tuple[ParamTarget, torch.Tensor | QuantizedWeight]]) -> set[_Slot]:
    """Fill ``model`` from ``(target, tensor)`` pairs; ValueError on a shape
    mismatch, an unknown or repeated target, or a parameter left unfilled.
    Returns the (parameter, part) slots given as quantized blocks, left unfilled."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = _expected_slots(model)
    loaded: set[_Slot] = set()
    deferred: set[_Slot] = set()
    for target, tensor in weights:
        if target.param_name == "lm_head.weight" and model.lm_head is None:
            continue  # a tied checkpoint may still carry its copy of the embedding
        slot = (target.param_name, target.shard)
        if slot not in expected:
            raise ValueError(f"checkpoint tensor for {_describe(slot)} has no place in the model")
        if slot in loaded:
            raise ValueError(f"checkpoint holds {_describe(slot)} twice")
        dest = params[target.param_name].data
        if target.shard is not None:
            owner = modules[target.param_name.rsplit(".", 1)[0]]
            assert isinstance(owner, MergedLinear)
            dest = dest[owner.shard_rows(target.shard)]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"{_describe(slot)}: checkpoint shape {tuple(tensor.shape)}, "
                             f"model expects {tuple(dest.shape)}")
        if isinstance(tensor, QuantizedWeight):
            deferred.add(slot)
        else:
            dest.copy_(tensor)
        loaded.add(slot)
    missing = sorted(expected - loaded, key=str)
    if missing:
        shown = ", ".join(_describe(slot) for slot in missing[:5])
        raise ValueError(f"checkpoint lacks {len(missing)} tensors: {shown}")
    return deferred


def _expected_slots(model: LlamaForCausalLM) -> set[_Slot]:
    slots: set[_Slot] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, MergedLinear):
                slots.update((full_name, shard) for shard in module.output_sizes)
            else:
                slots.add((full_name, None))
    return slots


def _describe(slot: _Slot) -> str:
    name, shard = slot
    return name if shard is None else f"{name}[{shard}]"
