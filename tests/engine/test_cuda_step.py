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


# -- CUDA graphs of decode steps (runner/cuda_graph.py) --------------------------------

GRAPH_PROMPTS = [[1] + [(13 * i + 7 * j) % 400 + 3 for j in range(5 + 3 * i)] for i in range(19)]


def _graph_engine(tiny_checkpoint, dtype: str, enforce_eager: bool) -> LLMEngine:
    return LLMEngine.from_options(model=str(tiny_checkpoint.hf_dir), device="cuda", dtype=dtype,
                                  max_num_seqs=24, enforce_eager=enforce_eager)


def _count_replays(monkeypatch) -> list[int]:
    """The batch sizes of the decode steps the graph runner served (replayed)."""
    from tokenloom.runner.cuda_graph import GraphRunner

    served: list[int] = []
    run = GraphRunner.run

    def counted(self, inputs):
        result = run(self, inputs)
        if result is not None:
            served.append(inputs.attn_metadata.num_seqs)
        return result

    monkeypatch.setattr(GraphRunner, "run", counted)
    return served


def _run_all(engine: LLMEngine, abort_after: dict[int, list[str]] | None = None) -> dict[str, list[int]]:
    """GRAPH_PROMPTS to the end, lengths 4, 6, ... so the batch shrinks through every bucket;
    ``abort_after``: step number -> request ids aborted after that step."""
    for i, prompt in enumerate(GRAPH_PROMPTS):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=4 + 2 * i, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        step += 1
        for request_id in (abort_after or {}).get(step, []):
            engine.abort_request(request_id)
    engine.check_integrity()
    return tokens


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_graph_replay_gives_the_eager_tokens_across_buckets(tiny_checkpoint, monkeypatch, dtype):
    from tokenloom.runner.graph_buckets import capture_sizes

    served = _count_replays(monkeypatch)
    graphs = _graph_engine(tiny_checkpoint, dtype, enforce_eager=False)
    assert graphs.runner.graphs is not None and graphs.runner.graphs.sizes == capture_sizes(24, 512)
    replayed = _run_all(graphs)
    assert {1, 2, 3, 5, 9, 17, 19} <= set(served)  # at, above and below bucket boundaries
    eager = _graph_engine(tiny_checkpoint, dtype, enforce_eager=True)
    assert eager.runner.graphs is None
    assert replayed == _run_all(eager)


def test_graph_replay_gives_the_eager_tokens_with_aborts_mid_batch(tiny_checkpoint, monkeypatch):
    aborts = {3: ["4", "11"], 6: ["7", "17", "18"]}  # each still running then
    served = _count_replays(monkeypatch)
    replayed = _run_all(_graph_engine(tiny_checkpoint, "bfloat16", enforce_eager=False), aborts)
    assert served and "4" in replayed and len(replayed["18"]) < 4 + 2 * 18
    assert replayed == _run_all(_graph_engine(tiny_checkpoint, "bfloat16", enforce_eager=True), aborts)
