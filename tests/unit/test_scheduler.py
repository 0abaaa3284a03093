from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenloom.config import SchedulerConfig
from tokenloom.kv_cache.manager import KVCacheManager
from tokenloom.request import Logprob, PositionLogprobs, Request, RequestStatus
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ModelOutput, SampledToken, ScheduledRequest, SchedulerOutput
from tokenloom.sched.scheduler import Scheduler

DEFAULT_TOKEN = 7


def make_scheduler(num_blocks: int = 16, block_size: int = 4, budget: int = 8,
                   max_num_seqs: int = 8, max_model_len: int = 64,
                   enable_prefix_caching: bool = False) -> Scheduler:
    """Prefix caching is off by default here: these tests pin the schedules and block
    ids of the plain paths (tests/unit/test_prefix_cache.py covers it on)."""
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                             max_model_len=max_model_len)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_prefix_caching))


def prompt_of(request_id: str, prompt_len: int) -> list[int]:
    base = 1000 * (1 + sum(map(ord, request_id)) % 50)
    return [base + i for i in range(prompt_len)]


def make_request(request_id: str, prompt_len: int, eos: tuple[int, ...] = (), parent_id: str | None = None,
                 sample_index: int = 0, **params: object) -> Request:
    params.setdefault("max_tokens", 16)
    prompt = prompt_of(parent_id or request_id, prompt_len)
    return Request(request_id, prompt, SamplingParams(**params), eos_token_ids=eos,
                   parent_id=parent_id, sample_index=sample_index, seed=sample_index)


def prompt_logprob(prompt: tuple[int, ...] | list[int], index: int) -> PositionLogprobs:
    return {prompt[index]: Logprob(logprob=-float(index), rank=1)}


def prompt_logprob_entries(s: ScheduledRequest) -> list[PositionLogprobs | None]:
    """What a runner returns for a chunk, following ModelOutput's contract."""
    start, prompt = s.num_computed_tokens, s.prompt_token_ids
    first = 0 if start == 0 else start + 1
    last = min(start + s.num_new_tokens, len(prompt) - 1)
    return [None if j == 0 else prompt_logprob(prompt, j) for j in range(first, last + 1)]


class FakeRunner:
    """Plays the model runner: checks every ScheduledRequest against the scheduler's
    own requests, then samples scripted tokens (DEFAULT_TOKEN once a script runs out)."""

    def __init__(self, sched: Scheduler, script: dict[str, list[int]] | None = None) -> None:
        self.sched = sched
        self.script = script or {}

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        ids: list[str] = []
        sampled: list[tuple[SampledToken, ...]] = []
        prompt_logprobs: dict[str, list[PositionLogprobs | None]] = {}
        for s in out.scheduled:
            self._check(s)
            if s.prompt_logprobs_start is not None:
                prompt_logprobs[s.request_id] = prompt_logprob_entries(s)
            if s.sample:
                ids.append(s.request_id)
                sampled.append(self._sample(s))
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= self.sched.config.max_num_batched_tokens
        return ModelOutput(tuple(ids), tuple(sampled), prompt_logprobs)

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        out = self.sched.schedule()
        self.sched.check_integrity()
        received = self.sched.update(out, self.execute(out))
        self.sched.check_integrity()
        return out, received

    def _check(self, s: ScheduledRequest) -> None:
        req = self.sched.get_request(s.request_id)
        assert req is not None and req.status is RequestStatus.RUNNING
        start = s.num_computed_tokens
        assert start == req.num_computed_tokens and s.num_new_tokens >= 1
        drafts = s.spec_token_ids
        assert drafts == tuple(req.spec_token_ids[:len(drafts)])
        assert s.token_ids == tuple(req.all_token_ids[start:start + s.num_new_tokens - len(drafts)]) + drafts
        assert s.block_ids == tuple(req.block_ids)
        assert len(s.block_ids) * self.sched.kv.block_size >= s.context_len
        assert s.context_len <= self.sched.config.max_model_len
        assert s.prompt_token_ids == tuple(req.prompt_token_ids)
        assert s.output_token_ids == tuple(req.output_token_ids)
        assert s.sample == (s.context_len - len(drafts) == req.num_tokens)
        assert not drafts or (s.sample and req.is_decoding)
        assert (s.seed, s.eos_token_ids, s.sampling_params) == (req.seed, req.eos_token_ids,
                                                                 req.sampling_params)

    def _sample(self, s: ScheduledRequest) -> tuple[SampledToken, ...]:
        """The script is the model: its next token at every verified position. Drafts
        stand while they agree with it, as the real verifier decides."""
        script = self.script.get(s.request_id)
        tokens: list[SampledToken] = []
        for i in range(1 + len(s.spec_token_ids)):
            token = script.pop(0) if script else DEFAULT_TOKEN
            logprobs = None
            if s.sampling_params.logprobs is not None:
                logprobs = {token: Logprob(logprob=-float(len(s.output_token_ids) + i), rank=1)}
            tokens.append(SampledToken(token, logprobs))
            if i < len(s.spec_token_ids) and token != s.spec_token_ids[i]:
                break
        return tuple(tokens)


def chunks(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request_id, s.num_new_tokens) for s in out.scheduled]


def run_to_completion(runner: FakeRunner, max_steps: int = 200) -> int:
    for step in range(max_steps):
        if not runner.sched.has_unfinished_requests():
            return step
        runner.step()
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


# ---- budgets and chunked prefill ---------------------------------------------


def test_chunked_prefill_budget_exact_chunks_and_blocks() -> None:
    sched = make_scheduler(budget=8)
    a, b = make_request("a", 20), make_request("b", 3)
    sched.add_request(a)
    sched.add_request(b)
    runner = FakeRunner(sched)

    out, received = runner.step()
    assert chunks(out) == [("a", 8)] and received == []
    assert out.scheduled[0].token_ids == tuple(a.prompt_token_ids[:8])
    assert out.scheduled[0].block_ids == (0, 1) and not out.scheduled[0].sample
    assert (sched.num_running, sched.num_waiting) == (1, 1)

    out, received = runner.step()
    assert chunks(out) == [("a", 8)] and received == []
    assert out.scheduled[0].block_ids == (0, 1, 2, 3)

    out, received = runner.step()
    assert chunks(out) == [("a", 4), ("b", 3)]
    assert [s.sample for s in out.scheduled] == [True, True]
    assert [s.block_ids for s in out.scheduled] == [(0, 1, 2, 3, 4), (5,)]
    assert received == [a, b]
    assert a.output_token_ids == b.output_token_ids == [DEFAULT_TOKEN]

    out, _ = runner.step()
    assert chunks(out) == [("a", 1), ("b", 1)]
    assert [s.token_ids for s in out.scheduled] == [(DEFAULT_TOKEN,), (DEFAULT_TOKEN,)]
    assert [s.num_computed_tokens for s in out.scheduled] == [20, 3]
    # a's 21st token opens a sixth block; b's 4 tokens still fit in one.
    assert [s.block_ids for s in out.scheduled] == [(0, 1, 2, 3, 4, 6), (5,)]
    assert out.num_batched_tokens == 2


def test_decodes_mix_with_a_prefill_chunk_in_one_step() -> None:
    sched = make_scheduler(budget=8)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", 3))
    sched.add_request(make_request("b", 2))
    assert chunks(runner.step()[0]) == [("a", 3), ("b", 2)]
    sched.add_request(make_request("c", 20))
    out, _ = runner.step()
    assert chunks(out) == [("a", 1), ("b", 1), ("c", 6)]
    assert [s.sample for s in out.scheduled] == [True, True, False]
    out, _ = runner.step()
    assert chunks(out) == [("a", 1), ("b", 1), ("c", 6)]
    assert out.scheduled[2].num_computed_tokens == 6


def test_max_num_seqs_caps_running_requests() -> None:
    sched = make_scheduler(budget=64, max_num_seqs=2)
    runner = FakeRunner(sched)
    for rid, max_tokens in (("a", 1), ("b", 3), ("c", 2)):
        sched.add_request(make_request(rid, 4, max_tokens=max_tokens))
    out, received = runner.step()
    assert chunks(out) == [("a", 4), ("b", 4)]
    assert [r.request_id for r in received if r.is_finished] == ["a"]
    assert sched.get_request("a") is None
    out, _ = runner.step()
    assert chunks(out) == [("b", 1), ("c", 4)]
    assert out.finished_ids == ("a",)
    assert run_to_completion(runner) == 1  # b: 3rd token, c: 2nd token
    assert sched.kv.num_free_blocks == 16


# ---- preemption by recompute --------------------------------------------------


def test_preempts_newest_running_request_and_resumes_it_by_recompute() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, budget=16)
    runner = FakeRunner(sched, {"a": [11, 12, 13, 14], "b": [21, 22, 23]})
    a = make_request("a", 7, max_tokens=4)
    b = make_request("b", 7, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)

    out, _ = runner.step()
    assert [s.block_ids for s in out.scheduled] == [(0, 1), (2, 3)]
    out, _ = runner.step()  # 8 tokens each: still two blocks
    assert chunks(out) == [("a", 1), ("b", 1)] and out.preempted_ids == ()

    out, _ = runner.step()  # a's 9th token needs a block: b (newest) goes
    assert out.preempted_ids == ("b",)
    assert chunks(out) == [("a", 1)]
    assert out.scheduled[0].block_ids == (0, 1, 3)  # b's blocks were freed tail first: [3, 2]
    assert (b.status, b.num_computed_tokens, b.block_ids, b.num_preemptions) == (
        RequestStatus.PREEMPTED, 0, [], 1)
    assert b.output_token_ids == [21, 22]

    out, _ = runner.step()  # b needs 3 blocks for its 9 tokens, 1 is free
    assert chunks(out) == [("a", 1)] and a.is_finished
    assert a.output_token_ids == [11, 12, 13, 14]
    assert a.status is RequestStatus.FINISHED_LENGTH

    out, received = runner.step()  # b recomputes prompt + its two outputs in one chunk
    assert out.finished_ids == ("a",)
    assert chunks(out) == [("b", 9)]
    s = out.scheduled[0]
    assert s.token_ids == tuple(b.prompt_token_ids) + (21, 22)
    assert s.sample and s.block_ids == (2, 3, 1)  # free queue: [2] then a's [3, 1, 0]
    assert received == [b] and b.output_token_ids == [21, 22, 23] and b.is_finished
    assert sched.kv.num_free_blocks == 4 and not sched.has_unfinished_requests()


def test_request_that_cannot_grow_preempts_itself_and_spares_older_ones() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, budget=16)
    runner = FakeRunner(sched)
    a = make_request("a", 5, max_tokens=3)
    b = make_request("b", 4, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = runner.step()
    assert [s.block_ids for s in out.scheduled] == [(0, 1), (2,)]

    out, _ = runner.step()  # b's 5th token needs a block; b is the newest
    assert out.preempted_ids == ("b",) and chunks(out) == [("a", 1)]
    assert b.status is RequestStatus.PREEMPTED and list(sched.waiting) == [b]

    out, _ = runner.step()  # b needs 2 blocks, 1 free: it waits; a finishes
    assert chunks(out) == [("a", 1)] and a.is_finished

    out, _ = runner.step()
    assert chunks(out) == [("b", 5)]
    assert out.scheduled[0].block_ids == (2, 1)  # free queue: [2] then a's [1, 0]
    assert b.num_preemptions == 1 and b.is_finished
    assert sched.kv.num_free_blocks == 3


def test_no_admission_in_a_step_that_preempted() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, budget=16)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", 4, max_tokens=5))
    sched.add_request(make_request("b", 4, max_tokens=5))
    runner.step()  # a: [0], b: [1]
    sched.add_request(make_request("c", 1, max_tokens=5))
    out, _ = runner.step()  # a: 5 tokens -> [0, 2]; b: 5 tokens -> none left, preempts itself
    assert out.preempted_ids == ("b",)
    assert chunks(out) == [("a", 1)]
    # c would fit in the free block b left, but a preempting step admits nobody.
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert sched.kv.num_free_blocks == 1
    assert run_to_completion(runner) > 0
    assert sched.kv.num_free_blocks == 3


# ---- admission ----------------------------------------------------------------


def test_rejects_prompt_longer_than_max_model_len() -> None:
    sched = make_scheduler(max_model_len=10)
    with pytest.raises(ValueError, match=r"prompt has 11 tokens, more than max_model_len \(10\)"):
        sched.add_request(make_request("a", 11))
    assert not sched.has_unfinished_requests()


def test_rejects_prompt_longer_than_whole_cache() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt has 9 tokens, more than the whole KV cache holds \(8\)"):
        sched.add_request(make_request("a", 9))
    sched.add_request(make_request("b", 8))
    assert sched.num_waiting == 1


def test_rejects_duplicate_and_reused_requests() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 2))
    with pytest.raises(ValueError, match="already in the scheduler"):
        sched.add_request(make_request("a", 2))
    used = make_request("b", 2)
    used.num_computed_tokens = 1
    with pytest.raises(ValueError, match="not new"):
        sched.add_request(used)
    sched.check_integrity()


# ---- stop conditions -------------------------------------------------------------


def run_one(req: Request, tokens: list[int], max_model_len: int = 64) -> Request:
    sched = make_scheduler(budget=64, max_model_len=max_model_len)
    sched.add_request(req)
    run_to_completion(FakeRunner(sched, {req.request_id: tokens}))
    assert sched.kv.num_free_blocks == 16
    return req


def test_eos_stops_without_stop_reason() -> None:
    req = run_one(make_request("a", 3, eos=(2,)), [5, 2, 6])
    assert req.output_token_ids == [5, 2]
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)


def test_ignore_eos_runs_to_max_tokens() -> None:
    req = run_one(make_request("a", 3, eos=(2,), ignore_eos=True, max_tokens=4), [2, 2, 2, 2, 2])
    assert req.output_token_ids == [2, 2, 2, 2]
    assert req.status is RequestStatus.FINISHED_LENGTH


def test_stop_token_id_sets_stop_reason() -> None:
    req = run_one(make_request("a", 3, eos=(2,), stop_token_ids=[9, 8]), [5, 8, 2])
    assert req.output_token_ids == [5, 8]
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, 8)


def test_eos_wins_over_stop_token_id() -> None:
    req = run_one(make_request("a", 3, eos=(2,), stop_token_ids=[2]), [2])
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)


def test_min_tokens_delays_eos_and_stop_ids() -> None:
    req = run_one(make_request("a", 3, eos=(2,), stop_token_ids=[9], min_tokens=3), [2, 9, 2, 5])
    assert req.output_token_ids == [2, 9, 2]
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)
    req = run_one(make_request("b", 3, eos=(2,), stop_token_ids=[9], min_tokens=2), [2, 9])
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, 9)


def test_max_tokens_gives_length() -> None:
    req = run_one(make_request("a", 3, max_tokens=5), [])
    assert req.output_token_ids == [DEFAULT_TOKEN] * 5
    assert (req.status, req.status.finish_reason) == (RequestStatus.FINISHED_LENGTH, "length")


def test_max_model_len_caps_prompt_plus_output() -> None:
    req = run_one(make_request("a", 6, max_tokens=None), [], max_model_len=10)
    assert req.num_output_tokens == 4 and req.num_tokens == 10
    assert req.status is RequestStatus.FINISHED_LENGTH
    # A prompt that fills max_model_len still yields the one token its logits give.
    req = run_one(make_request("b", 10, max_tokens=None), [], max_model_len=10)
    assert req.num_output_tokens == 1 and req.status is RequestStatus.FINISHED_LENGTH


def test_output_logprobs_are_collected_per_token() -> None:
    req = run_one(make_request("a", 2, logprobs=0, max_tokens=3), [4, 5, 6])
    assert req.output_logprobs == [{4: Logprob(-0.0, 1)}, {5: Logprob(-1.0, 1)}, {6: Logprob(-2.0, 1)}]
    req = run_one(make_request("b", 2, max_tokens=2), [4, 5])
    assert req.output_logprobs == []


# ---- finish_requests / abort ---------------------------------------------------------


def test_abort_frees_blocks_of_running_and_waiting_requests() -> None:
    sched = make_scheduler(budget=8)
    runner = FakeRunner(sched)
    a, b = make_request("a", 6), make_request("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    runner.step()  # a: 6 tokens, b: 2 tokens
    assert (a.block_ids, b.block_ids) == ([0, 1], [2])
    sched.add_request(make_request("c", 3))
    sched.finish_requests(["b", "c", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert b.block_ids == [] and b.status is RequestStatus.FINISHED_ABORTED
    assert sched.kv.pool.free_block_ids()[-1] == 2
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)  # idempotent
    sched.check_integrity()
    out, _ = runner.step()
    assert out.finished_ids == ("b", "c") and chunks(out) == [("a", 1)]
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    assert a.status is RequestStatus.FINISHED_STOPPED
    assert sched.kv.num_free_blocks == 16 and not sched.has_unfinished_requests()
    assert sched.schedule().finished_ids == ("a",)
    assert sched.schedule().finished_ids == ()
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests("a", RequestStatus.RUNNING)


def test_abort_while_step_runs_drops_its_result() -> None:
    sched = make_scheduler()
    runner = FakeRunner(sched)
    a, b = make_request("a", 3), make_request("b", 3)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    model_output = runner.execute(out)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.update(out, model_output) == [b]
    assert a.output_token_ids == [] and b.output_token_ids == [DEFAULT_TOKEN]
    sched.check_integrity()


def test_update_rejects_inconsistent_model_output() -> None:
    sched = make_scheduler()
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", 3))
    out = sched.schedule()
    with pytest.raises(ValueError, match=r"model output sampled \[\] but the step expected \['a'\]"):
        sched.update(out, ModelOutput())
    model_output = runner.execute(out)
    sched.update(out, model_output)
    with pytest.raises(ValueError, match="stale scheduler output for a"):
        sched.update(out, model_output)
    sched.check_integrity()


def test_check_integrity_catches_broken_queues() -> None:
    sched = make_scheduler()
    runner = FakeRunner(sched)
    a = make_request("a", 3)
    sched.add_request(a)
    runner.step()
    sched.waiting.append(a)
    with pytest.raises(AssertionError, match="disagree with the unfinished requests"):
        sched.check_integrity()
    sched.waiting.clear()
    a.status = RequestStatus.WAITING
    with pytest.raises(AssertionError, match="running request in a bad state"):
        sched.check_integrity()
    a.status = RequestStatus.RUNNING
    sched.kv.pool.incref(a.block_ids)
    with pytest.raises(AssertionError, match="block 0 has ref count 2 but 1 request"):
        sched.check_integrity()


# ---- n > 1: samples share the prompt's blocks -------------------------------------------


def add_samples(sched: Scheduler, parent: str, n: int, prompt_len: int, **params: object) -> list[Request]:
    samples = [make_request(f"{parent}-{i}", prompt_len, parent_id=parent, sample_index=i, n=n, **params)
               for i in range(n)]
    for req in samples:
        sched.add_request(req)
    return samples


def test_samples_share_full_prompt_blocks_by_ref_count() -> None:
    sched = make_scheduler(budget=32)
    runner = FakeRunner(sched)
    s0, s1, s2 = add_samples(sched, "p", 3, 10)
    sched.add_request(make_request("q", 2))

    out, _ = runner.step()  # siblings wait for s0's prompt; q behind them still runs
    assert chunks(out) == [("p-0", 10), ("q", 2)]
    assert [r.request_id for r in sched.waiting] == ["p-1", "p-2"]

    out, _ = runner.step()
    assert chunks(out) == [("p-0", 1), ("q", 1), ("p-1", 2), ("p-2", 2)]
    assert s0.block_ids == [0, 1, 2] and sched.get_request("q").block_ids == [3]
    assert (s1.block_ids, s2.block_ids) == ([0, 1, 4], [0, 1, 5])
    assert [sched.kv.pool.ref_count(b) for b in range(6)] == [3, 3, 1, 1, 1, 1]
    s1_step = out.scheduled[2]
    assert (s1_step.num_computed_tokens, s1_step.token_ids) == (8, tuple(s1.prompt_token_ids[8:]))
    assert s1_step.sample and s1.num_output_tokens == 1

    sched.finish_requests(["p-0"], RequestStatus.FINISHED_ABORTED)
    assert [sched.kv.pool.ref_count(b) for b in (0, 1, 2)] == [2, 2, 0]
    sched.check_integrity()
    run_to_completion(runner)
    assert sched.kv.num_free_blocks == 16


def test_sample_waits_while_sibling_prefills_in_chunks() -> None:
    sched = make_scheduler(budget=8)
    runner = FakeRunner(sched)
    s0, s1 = add_samples(sched, "p", 2, 10)
    assert chunks(runner.step()[0]) == [("p-0", 8)]
    assert chunks(runner.step()[0]) == [("p-0", 2)]  # s0 has 8 < 9 computed: s1 waits
    out, _ = runner.step()
    assert chunks(out) == [("p-0", 1), ("p-1", 2)]
    assert s1.block_ids == [0, 1, 3]


def test_sample_prefills_alone_when_no_sibling_runs() -> None:
    sched = make_scheduler(budget=32)
    runner = FakeRunner(sched)
    s0, s1 = add_samples(sched, "p", 2, 6, max_tokens=1)
    runner.step()  # s0 prefills and finishes at once
    assert s0.is_finished
    out, _ = runner.step()
    assert chunks(out) == [("p-1", 6)]
    assert out.scheduled[0].block_ids == (2, 3)  # s0's freed [1, 0] joined the queue's tail


def test_short_prompt_samples_share_nothing() -> None:
    sched = make_scheduler(budget=32)
    runner = FakeRunner(sched)
    s0, s1 = add_samples(sched, "p", 2, 3)
    runner.step()
    out, _ = runner.step()
    assert chunks(out) == [("p-0", 1), ("p-1", 3)]
    assert (s0.block_ids, s1.block_ids) == ([0], [1])


# ---- prompt logprobs ---------------------------------------------------------------


def expected_prompt_logprobs(req: Request) -> list[PositionLogprobs | None]:
    return [None] + [prompt_logprob(req.prompt_token_ids, j) for j in range(1, req.num_prompt_tokens)]


def test_prompt_logprobs_across_chunks() -> None:
    sched = make_scheduler(budget=4)
    runner = FakeRunner(sched)
    req = make_request("a", 10, prompt_logprobs=0, max_tokens=2)
    sched.add_request(req)
    starts, dones = [], []
    while sched.has_unfinished_requests():
        out, _ = runner.step()
        starts.append(out.scheduled[0].prompt_logprobs_start)
        dones.append(req.num_prompt_logprobs_done)
    assert starts == [0, 4, 8, None]
    assert dones == [5, 9, 10, 10]
    assert req.prompt_logprobs == expected_prompt_logprobs(req)


def test_prompt_logprobs_not_duplicated_by_recompute() -> None:
    sched = make_scheduler(num_blocks=5, block_size=2, budget=4)
    runner = FakeRunner(sched)
    a = make_request("a", 2, max_tokens=3)
    b = make_request("b", 10, prompt_logprobs=1, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    assert chunks(runner.step()[0]) == [("a", 2), ("b", 2)]
    assert chunks(runner.step()[0]) == [("a", 1), ("b", 3)]
    assert b.num_prompt_logprobs_done == 6
    out, _ = runner.step()  # b needs a fifth block; it is the newest
    assert out.preempted_ids == ("b",) and a.is_finished
    assert (b.num_computed_tokens, b.num_prompt_logprobs_done) == (0, 6)
    trace = []
    while sched.has_unfinished_requests():
        out, _ = runner.step()
        s = out.scheduled[0]
        trace.append((s.num_computed_tokens, s.num_new_tokens, s.prompt_logprobs_start,
                      b.num_prompt_logprobs_done))
    assert trace == [(0, 4, 0, 6), (4, 4, 4, 9), (8, 2, 8, 10)]
    assert b.prompt_logprobs == expected_prompt_logprobs(b)


def test_shared_sample_copies_prompt_logprobs_from_sibling() -> None:
    sched = make_scheduler(budget=32)
    runner = FakeRunner(sched)
    s0, s1 = add_samples(sched, "p", 2, 10, prompt_logprobs=0, max_tokens=2)
    runner.step()
    out, _ = runner.step()
    assert chunks(out) == [("p-0", 1), ("p-1", 2)]
    assert out.scheduled[1].prompt_logprobs_start is None
    assert s1.prompt_logprobs == s0.prompt_logprobs == expected_prompt_logprobs(s0)
    assert s1.num_prompt_logprobs_done == 10


# ---- random workloads ------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 24), st.integers(1, 8), st.integers(1, 3),
                  st.booleans()),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 40)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 24),
       max_num_seqs=st.integers(1, 6))
def test_random_workloads_keep_integrity_and_finish(ops: list[tuple], block_size: int, budget: int,
                                                    max_num_seqs: int) -> None:
    num_blocks = 24 // block_size
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=budget,
                           max_num_seqs=max_num_seqs, max_model_len=24)
    # Token 3 is eos for every request: some stop early, the rest hit a length limit.
    runner = FakeRunner(sched, {})
    added: list[Request] = []
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, n, logprobs = op
            parent = f"r{len(added)}"
            params = dict(max_tokens=max_tokens, prompt_logprobs=0 if logprobs else None)
            samples = add_samples(sched, parent, n, prompt_len, eos=(3,), **params)
            for req in samples:
                runner.script[req.request_id] = [(len(added) + i + req.sample_index) % 5 for i in range(8)]
            added.extend(samples)
        elif op[0] == "step":
            runner.step()
        elif added:
            sched.finish_requests([added[op[1] % len(added)].request_id], RequestStatus.FINISHED_ABORTED)
        sched.check_integrity()
    run_to_completion(runner, max_steps=2000)
    assert all(req.is_finished and req.block_ids == [] for req in added)
    assert sched.kv.num_free_blocks == num_blocks and sched.num_running == sched.num_waiting == 0
    for req in added:
        if req.status is not RequestStatus.FINISHED_ABORTED:
            assert req.num_tokens <= 24 or req.num_output_tokens == 1
            if req.sampling_params.prompt_logprobs is not None:
                assert req.prompt_logprobs == expected_prompt_logprobs(req)


# ---- structured output -------------------------------------------------------------


class FakeGrammar:
    """A grammar that accepts ``allowed`` tokens and is complete after ``length`` of them."""

    def __init__(self, ready: bool = True, allowed: tuple[int, ...] = (5, 6), length: int = 3,
                 error: str | None = None) -> None:
        self.is_ready, self.error = ready, error
        self.allowed, self.length = allowed, length
        self.consumed: list[int] = []

    def accept(self, token_id: int) -> bool:
        if token_id not in self.allowed:
            return False
        self.consumed.append(token_id)
        return True

    @property
    def is_terminated(self) -> bool:
        return len(self.consumed) >= self.length


def test_request_waits_for_its_grammar_without_blocking_the_queue() -> None:
    sched = make_scheduler(budget=16)
    grammar = FakeGrammar(ready=False)
    slow = make_request("slow", 3)
    slow.grammar = grammar
    sched.add_request(slow)
    sched.add_request(make_request("free", 3))
    runner = FakeRunner(sched)
    out, _ = runner.step()
    assert chunks(out) == [("free", 3)]
    assert [r.request_id for r in sched.waiting] == ["slow"] and not slow.block_ids
    grammar.is_ready = True
    out, _ = runner.step()
    assert chunks(out) == [("free", 1), ("slow", 3)]


def test_grammar_follows_tokens_and_its_completion_stops_the_request() -> None:
    req = make_request("a", 3, eos=(2,), max_tokens=10)
    req.grammar = FakeGrammar(length=3)
    run_one(req, [5, 6, 5, 6, 6])
    assert req.output_token_ids == [5, 6, 5] and req.grammar.consumed == [5, 6, 5]
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)


def test_token_the_grammar_refuses_stops_the_request() -> None:
    req = make_request("a", 3, max_tokens=10)
    req.grammar = FakeGrammar(length=5)
    run_one(req, [5, 9, 6])
    assert req.output_token_ids == [5, 9] and req.status is RequestStatus.FINISHED_STOPPED


def test_failed_grammar_is_never_scheduled() -> None:
    sched = make_scheduler()
    req = make_request("bad", 3)
    req.grammar = FakeGrammar(error="does not compile")
    sched.add_request(req)
    assert sched.schedule().is_empty and list(sched.waiting) == [req]
    sched.finish_requests("bad", RequestStatus.FINISHED_ABORTED)
    sched.check_integrity()
    assert sched.kv.num_free_blocks == 16
