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
from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.loader.safetensors import build_float_model

DUMMY_WEIGHT_STD = 0.02


def load_dummy_model(config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str,
                     quantization: str = "none", seed: int = 0) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """``quantization``: see ``loader/quantize.py`` (random weights have no blocks of
    their own, so "auto" keeps them dense, as for a safetensors checkpoint)."""
    return build_float_model(config, dtype, device, quantization, lambda model: fill_random(model, seed))


@torch.inference_mode()
def fill_random(model: torch.nn.Module, seed: int) -> None:
    """Norm weights to 1, every other parameter (projections, embedding, biases) to
    normal(0, DUMMY_WEIGHT_STD); in ``named_parameters`` order, so the seed fixes them."""
    device = next(model.parameters()).device  # a model lives on one device
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_WEIGHT_STD, generator=generator)
