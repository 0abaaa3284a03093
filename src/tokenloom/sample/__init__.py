"""Sampling: logits -> token ids and logprobs (see ``Sampler`` for the order of transforms)."""

from __future__ import annotations

from tokenloom.sample.logprobs import compute_prompt_logprobs
from tokenloom.sample.metadata import SamplingMetadata, build_sampling_metadata
from tokenloom.sample.sampler import Sampler, SamplerOutput, sample

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "build_sampling_metadata",
    "compute_prompt_logprobs",
    "sample",
]
