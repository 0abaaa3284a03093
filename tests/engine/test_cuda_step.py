"""The CUDA step: no host sync between building a step and fetching its tokens,
and the engine's tokens equal the reference backend's. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.model.layers.backend import BACKEND_ENV
from tokenloom.sampling_params import SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[1] + [(13 * i) % 400 + 3 for i in range(n)] for n in (40, 7, 23)]


def _engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine.from_options(model=str(tiny_checkpoint.hf_dir), device="cuda", dtype="bfloat16")


def _generate(engine: LLMEngine, params: list[SamplingParams]) -> dict[str, list[int]]:
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), prompt, p)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return tokens


def test_a_step_queues_everything_without_waiting(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    assert engine.runner.model.ops.name == "triton"
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.9, top_k=20, top_p=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.7, min_p=0.1, seed=4, ignore_eos=True)]
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), prompt, p)
    engine.step()  # prefills (and compiles the kernels)
    engine.step()
    out = engine.scheduler.schedule()  # a decode step of all three
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            _, _, result = engine.runner.forward_and_sample(out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result is not None and result.token_ids.shape == (3,)


def test_greedy_tokens_equal_the_reference_backend(tiny_checkpoint, monkeypatch):
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)] * 3
    triton_tokens = _generate(_engine(tiny_checkpoint), params)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    reference = _engine(tiny_checkpoint)
    assert reference.runner.model.ops.name == "torch"
    assert _generate(reference, params) == triton_tokens
