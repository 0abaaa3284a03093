"""Overlapped (async) scheduling: step N+1 is planned before step N's tokens are applied.

A sequence whose step N samples is planned again for N+1 with ``token_from_last_step``
(its input token comes from the device); ``update`` of step N then lands while N+1 is
in flight. Exact schedules, block ids and stops, and the same outputs as plain steps.
"""

from __future__ import annotations

from tests.unit.test_scheduler import make_request, make_scheduler
from tokenloom.request import Request, RequestStatus
from tokenloom.sched.output import ModelOutput, SampledToken, SchedulerOutput
from tokenloom.sched.scheduler import Scheduler


def sampled(out: SchedulerOutput, tokens: dict[str, int]) -> ModelOutput:
    ids = tuple(s.request_id for s in out.scheduled if s.sample)
    return ModelOutput(ids, tuple((SampledToken(tokens[i]),) for i in ids))


def test_a_decode_is_planned_before_its_last_token_is_known():
    sched = make_scheduler(budget=8)
    a = make_request("a", 6, max_tokens=3)
    sched.add_request(a)
    out1 = sched.schedule()
    assert [(s.request_id, s.num_computed_tokens, s.num_new_tokens, s.sample) for s in out1.scheduled] == \
        [("a", 0, 6, True)]
    out2 = sched.schedule()  # out1 is still in flight
    (s2,) = out2.scheduled
    assert (s2.num_computed_tokens, s2.num_new_tokens, s2.token_ids, s2.sample) == (6, 1, (0,), True)
    assert s2.token_from_last_step and s2.output_token_ids == () and s2.num_output_tokens == 1
    assert s2.block_ids == (0, 1) and a.block_ids == [0, 1]  # 7 tokens in blocks of 4
    assert (a.num_computed_tokens, a.num_inflight_tokens, a.num_inflight_outputs) == (0, 7, 2)

    assert sched.update(out1, sampled(out1, {"a": 11})) == [a]
    assert (a.output_token_ids, a.num_computed_tokens, a.num_inflight_tokens) == ([11], 6, 1)
    out3 = sched.schedule()
    (s3,) = out3.scheduled
    assert (s3.num_computed_tokens, s3.output_token_ids, s3.token_from_last_step) == (7, (11,), True)
    assert sched.update(out2, sampled(out2, {"a": 12})) == [a]
    # a's next token is its third and last (max_tokens): nothing is planned past it.
    assert sched.schedule().is_empty
    assert sched.update(out3, sampled(out3, {"a": 13})) == [a]
    assert (a.output_token_ids, a.status) == ([11, 12, 13], RequestStatus.FINISHED_LENGTH)
    assert not sched.has_unfinished_requests() and sched.kv.pool.num_used_blocks == 0
    sched.check_integrity()


def test_a_stop_in_flight_drops_the_token_planned_after_it():
    sched = make_scheduler(budget=8)
    a = make_request("a", 4, eos=(5,), max_tokens=10)
    b = make_request("b", 3, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()
    out2 = sched.schedule()
    assert [(s.request_id, s.token_from_last_step) for s in out2.scheduled] == [("a", True), ("b", True)]
    received = sched.update(out1, sampled(out1, {"a": 5, "b": 8}))  # a's EOS
    assert [r.request_id for r in received] == ["a", "b"] and a.status is RequestStatus.FINISHED_STOPPED
    assert a.block_ids == [] and sched.running == [b]
    out3 = sched.schedule()
    assert [s.request_id for s in out3.scheduled] == ["b"]
    assert sched.update(out2, sampled(out2, {"a": 9, "b": 9})) == [b]  # a's extra token is dropped
    assert a.output_token_ids == [5] and b.output_token_ids == [8, 9]
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)  # an abort while out3 is in flight
    assert sched.update(out3, sampled(out3, {"b": 1})) == []
    assert sched.kv.pool.num_used_blocks == 0
    sched.check_integrity()


def test_a_sequence_whose_sampling_reads_its_output_is_not_planned_ahead():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("a", 4, max_tokens=5))
    out = sched.schedule()
    assert sched.can_schedule_ahead()
    sched.update(out, sampled(out, {"a": 3}))
    sched.add_request(make_request("p", 4, max_tokens=5, repetition_penalty=1.2))
    out = sched.schedule()
    assert not sched.can_schedule_ahead()  # p's penalty counts the token in flight
    sched.update(out, sampled(out, {"a": 3, "p": 3}))
    assert sched.can_schedule_ahead()


def model_token(request_id: str, position: int) -> int:
    """A deterministic model: the token after ``position`` depends on nothing else, so a
    sequence recomputed after preemption samples what it did before."""
    return 100 + (sum(map(ord, request_id)) * 7 + position * 13) % 50


def run(sched: Scheduler, requests: list[Request], overlapped: bool) -> dict[str, list[int]]:
    for req in requests:
        sched.add_request(req)
    in_flight = None
    for _ in range(500):
        if not sched.has_unfinished_requests() and in_flight is None:
            break
        out = sched.schedule()
        result = sampled(out, {s.request_id: model_token(s.request_id, s.context_len) for s in out.scheduled})
        if not overlapped:
            sched.update(out, result)
            continue
        if in_flight is not None:
            sched.update(*in_flight)
        in_flight = None if out.is_empty else (out, result)
    sched.check_integrity()
    assert sched.kv.pool.num_used_blocks == 0
    return {r.request_id: r.output_token_ids for r in requests}


def test_overlapped_steps_give_the_plain_outputs_through_chunks_preemption_and_stops():
    def requests() -> list[Request]:
        return [make_request("a", 9, max_tokens=12), make_request("b", 5, max_tokens=20, eos=(model_token("b", 12),)),
                make_request("c", 14, max_tokens=9), make_request("d", 3, max_tokens=15)]

    plain_sched = make_scheduler(num_blocks=10, budget=6)
    plain = run(plain_sched, requests(), overlapped=False)
    overlapped_reqs = requests()
    overlapped = run(make_scheduler(num_blocks=10, budget=6), overlapped_reqs, overlapped=True)
    assert overlapped == plain
    assert plain["b"][-1] == model_token("b", 12) and len(plain["b"]) < 20  # b stopped at its EOS
    assert sum(r.num_preemptions for r in overlapped_reqs) > 0  # 10 blocks of 4 cannot hold all four
