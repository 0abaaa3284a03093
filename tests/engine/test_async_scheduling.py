"""Async scheduling on a real (tiny) model: step N+1 is queued before step N's tokens are
applied, its input tokens read on the device, and the outputs are the plain steps' own."""

from __future__ import annotations

import pytest

from tokenloom import LLM, SamplingParams
from tokenloom.engine.llm_engine import LLMEngine

PROMPTS = ["The cat sat on the mat", "def add(a, b):", "1 2 3 4 5 6 7 8 9 10 11 12", "hello there", "Once upon"]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=3, max_tokens=17, min_tokens=5),
    SamplingParams(temperature=0, max_tokens=30, stop=["e"], include_stop_str_in_output=True),
    SamplingParams(temperature=0, max_tokens=9, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=5, max_tokens=25, n=2, logprobs=2, prompt_logprobs=1, ignore_eos=True),
]


def engine_options(overlapped: bool, **options) -> dict:
    return {"num_kv_blocks": 128, "block_size": 4, "max_num_batched_tokens": 8, "enable_prefix_caching": False,
            "async_scheduling": overlapped, **options}


def outputs(llm: LLM, prompts=PROMPTS, params=PARAMS):
    results = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_integrity()
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    return [(r.prompt_logprobs, [(c.token_ids, c.text, c.logprobs, c.finish_reason) for c in r.outputs])
            for r in results]


def record_calls(engine: LLMEngine) -> list[str]:
    calls: list[str] = []
    runner = engine.runner
    launch, collect = runner.launch, runner.collect

    def recording_launch(out, *args):
        calls.append("launch+" if any(s.token_from_last_step for s in out.scheduled) else "launch")
        return launch(out, *args)

    def recording_collect(step):
        calls.append("collect")
        return collect(step)

    runner.launch, runner.collect = recording_launch, recording_collect
    return calls


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_overlapped_steps_give_the_plain_outputs(tiny_checkpoint, prefix_caching):
    model = str(tiny_checkpoint.hf_dir)
    # The last prompt shares its first blocks with the first: a prefix-cache hit when on.
    prompts, params = [*PROMPTS, PROMPTS[0] + " and the dog"], [*PARAMS, PARAMS[0]]
    plain = outputs(LLM(model, **engine_options(False, enable_prefix_caching=prefix_caching)), prompts, params)
    llm = LLM(model, **engine_options(True, enable_prefix_caching=prefix_caching))
    calls = record_calls(llm.engine)
    assert outputs(llm, prompts, params) == plain
    if prefix_caching:
        assert llm.engine.stats.snapshot().prefix_cache_hits_total > 0
    # Step N+1 was queued, reading its tokens on the device, before step N was collected.
    assert calls[:3] == ["launch", "launch", "collect"] and "launch+" in calls
    assert calls.count("launch") + calls.count("launch+") == calls.count("collect")


def test_preemption_and_aborts_while_a_step_is_in_flight(tiny_checkpoint):
    model = str(tiny_checkpoint.hf_dir)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    small = {"num_kv_blocks": 24}  # 96 tokens for four sequences of ~50: preemption by recompute
    plain = outputs(LLM(model, **engine_options(False, **small)), PROMPTS[:4], greedy)
    llm = LLM(model, **engine_options(True, **small))
    assert outputs(llm, PROMPTS[:4], greedy) == plain
    assert llm.engine.stats.snapshot().num_preemptions_total > 0

    engine = llm.engine
    engine.add_request("stays", PROMPTS[0], greedy)
    engine.add_request("leaves", PROMPTS[1], greedy)
    tokens = []
    for _ in range(6):
        tokens += [t for out in engine.step() if out.request_id == "stays" for t in out.outputs[0].token_ids]
    assert engine._in_flight is not None
    engine.abort_request("leaves")  # its blocks go now; the step in flight still holds a token of it
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "stays"
            tokens += out.outputs[0].token_ids
    assert tokens == plain[0][1][0][0]
    engine.check_integrity()
    assert engine.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize("stop_at", [1, 6])
def test_a_stop_token_ends_the_output_exactly(tiny_checkpoint, stop_at):
    model = str(tiny_checkpoint.hf_dir)
    free = LLM(model, **engine_options(False)).generate(
        [PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    stop_id = free[0].outputs[0].token_ids[stop_at]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    plain = outputs(LLM(model, **engine_options(False)), [PROMPTS[2]], params)
    overlapped = outputs(LLM(model, **engine_options(True)), [PROMPTS[2]], params)
    assert overlapped == plain
    token_ids, _, _, reason = overlapped[0][1][0]
    assert token_ids[-1] == stop_id and stop_id not in token_ids[:-1] and reason == "stop"


def test_an_id_sent_again_while_its_old_step_is_in_flight_gets_its_own_tokens(tiny_checkpoint):
    engine = LLM(str(tiny_checkpoint.hf_dir), **engine_options(True)).engine
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("r", PROMPTS[0], greedy)
    for _ in range(5):
        engine.step()
    assert engine._in_flight is not None and any(s.request_id == "r" for s in engine._in_flight[0].scheduled)
    engine.abort_request("r")
    engine.add_request("r", PROMPTS[1], greedy)  # the old step's results must not land on it
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() for t in out.outputs[0].token_ids]
    alone = LLM(str(tiny_checkpoint.hf_dir), **engine_options(False)).generate([PROMPTS[1]], greedy, use_tqdm=False)
    assert tokens == alone[0].outputs[0].token_ids
    engine.check_integrity()
