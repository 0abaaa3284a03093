"""Random weights in a model's shape (vLLM's ``--load-format dummy``): benchmark a
shape without its checkpoint.

Every weight is drawn from normal(0, 0.02) (HF's ``initializer_range``, so
activations stay in the range of a trained model's) and every norm is 1. The
values are drawn on the model's device, in its dtype, by one generator seeded
from ``ModelConfig.seed``: an 8B model on a GPU is filled in a moment, never
generated on the host and copied over. Same seed, device and dtype: the same
weights. The model then runs as any float checkpoint does (``build_float_model``).
"""

from __future__ import annotations

import torch

from tokenloom.config import ModelArchConfig
from tokenloom.model.layers.linear import MergedLinear
from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.loader.safetensors import build_float_model
from tokenloom.parallel.group import SINGLE, TPGroup
from tokenloom.parallel.layout import TPShard, take

DUMMY_WEIGHT_STD = 0.02


def load_dummy_model(config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                     quantization: str = "none", seed: int = 0,
                     group: TPGroup = SINGLE) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """``quantization``: see ``loader/quantize.py`` (random weights have no blocks of
    their own, so "auto" keeps them dense, as for a safetensors checkpoint). Under
    tensor parallelism each rank holds its part of the very weights one rank would."""
    return build_float_model(config, dtype, device, quantization, lambda model: fill_random(model, seed), group)


@torch.inference_mode()
def fill_random(model: LlamaForCausalLM, seed: int) -> None:
    """Norm weights to 1, every other parameter (projections, embedding, biases) to
    normal(0, DUMMY_WEIGHT_STD); in ``named_parameters`` order of the whole model, so
    the seed fixes them (a tensor-parallel rank draws each whole and keeps its part)."""
    param = next(model.parameters())  # a model lives on one device
    generator = torch.Generator(param.device).manual_seed(seed)
    shard = model.shard
    whole = model if shard.size == 1 else type(model)(model.config, param.dtype, "meta")
    params = dict(model.named_parameters())
    modules = dict(whole.named_modules())
    for name, full in whole.named_parameters():
        if name.endswith("norm.weight"):
            params[name].fill_(1.0)
        elif shard.size == 1:
            params[name].normal_(0.0, DUMMY_WEIGHT_STD, generator=generator)
        else:
            value = torch.empty(full.shape, dtype=param.dtype, device=param.device)
            value.normal_(0.0, DUMMY_WEIGHT_STD, generator=generator)
            params[name].copy_(_part_of(value, name, modules[name.rsplit(".", 1)[0]], shard))


def _part_of(value: torch.Tensor, name: str, module: torch.nn.Module, shard: TPShard) -> torch.Tensor:
    """``shard``'s rows / columns of a whole parameter (each part of a fused one in turn)."""
    if not isinstance(module, MergedLinear):
        return take(value, shard.param_slice(name, None))
    return torch.cat([take(value[module.shard_rows(part)], shard.param_slice(name, part))
                      for part in module.output_sizes])
