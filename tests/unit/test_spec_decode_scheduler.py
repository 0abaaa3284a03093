"""Speculative decoding in the scheduler: drafts ride in the token budget, accepted
tokens append, rejected drafts' slots go back, stops cut the accepted run.

The FakeRunner plays a model whose next token is the script's; it accepts drafts
while they agree with it, as the real verify step does."""

from __future__ import annotations

import pytest

from tests.unit.test_scheduler import FakeRunner, chunks, make_request, make_scheduler
from tokenloom.sched.output import ModelOutput, SampledToken


def prefilled(sched, runner, req, first_token_script):
    sched.add_request(req)
    runner.step()
    assert req.output_token_ids == [first_token_script]
    assert req.is_decoding


def test_drafts_ride_along_and_accepted_ones_append() -> None:
    sched = make_scheduler(budget=16, block_size=4)
    a = make_request("a", 6)
    runner = FakeRunner(sched, {"a": [11, 12, 13, 99, 15]})
    prefilled(sched, runner, a, 11)
    a.spec_token_ids = [12, 13, 14]
    out, received = runner.step()
    (s,) = out.scheduled
    assert chunks(out) == [("a", 4)] and s.spec_token_ids == (12, 13, 14)
    assert s.token_ids == (11, 12, 13, 14) and s.num_computed_tokens == 6 and s.sample
    assert s.block_ids == (0, 1, 2)  # positions 6..9
    assert received == [a]
    # 12 and 13 accepted, 14 rejected: the model's 99 takes its place.
    assert a.output_token_ids == [11, 12, 13, 99]
    assert a.num_computed_tokens == 9 and a.spec_token_ids == []
    out, _ = runner.step()
    assert out.scheduled[0].token_ids == (99,) and out.scheduled[0].num_computed_tokens == 9


def test_rejected_drafts_give_their_blocks_back() -> None:
    sched = make_scheduler(num_blocks=8, budget=16, block_size=4)
    a = make_request("a", 6)
    runner = FakeRunner(sched, {"a": [11, 50]})
    prefilled(sched, runner, a, 11)
    a.spec_token_ids = [1, 2, 3, 4, 5, 6]
    out, _ = runner.step()
    assert out.scheduled[0].block_ids == (0, 1, 2, 3)  # positions 6..12
    assert a.output_token_ids == [11, 50] and a.num_computed_tokens == 7
    assert a.block_ids == [0, 1]  # 8 tokens: blocks 2 and 3 held only rejected drafts
    assert sched.kv.pool.free_block_ids()[:2] == [4, 5] and sched.kv.num_free_blocks == 6
    sched.check_integrity()


def test_the_budget_cuts_drafts_short() -> None:
    sched = make_scheduler(budget=3)
    a = make_request("a", 2)
    runner = FakeRunner(sched, {"a": [11, 12, 13, 14]})
    prefilled(sched, runner, a, 11)
    a.spec_token_ids = [12, 13, 14, 15, 16]
    out, _ = runner.step()
    assert out.scheduled[0].spec_token_ids == (12, 13) and out.num_batched_tokens == 3
    assert a.output_token_ids == [11, 12, 13, 14]  # both drafts and the bonus token


@pytest.mark.parametrize("stop", ["eos", "stop_token_ids", "max_tokens"])
def test_a_stop_inside_the_accepted_run_ends_the_output_there(stop) -> None:
    sched = make_scheduler(budget=16)
    options = {"eos": dict(eos=(13,)), "stop_token_ids": dict(stop_token_ids=[13]),
               "max_tokens": dict(max_tokens=3)}[stop]
    a = make_request("a", 5, **options)
    runner = FakeRunner(sched, {"a": [11, 12, 13, 14, 15]})
    prefilled(sched, runner, a, 11)
    a.spec_token_ids = [12, 13, 14, 15]
    _, received = runner.step()
    assert received == [a] and a.is_finished
    assert a.output_token_ids == [11, 12, 13]  # 14, 15 and the bonus never reach the output
    assert a.status.finish_reason == ("length" if stop == "max_tokens" else "stop")
    assert a.block_ids == [] and sched.kv.num_free_blocks == 16


def test_drafts_are_dropped_on_preemption() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, budget=16)
    a, b = make_request("a", 4), make_request("b", 4)
    runner = FakeRunner(sched, {"a": [11, 12], "b": [21, 22]})
    sched.add_request(a)
    sched.add_request(b)
    runner.step()
    b.spec_token_ids = [22, 23, 24, 25]
    a.spec_token_ids = [12, 13, 14, 15]
    out, _ = runner.step()
    # a's drafts need a third block, so b (the newest) is preempted and loses its drafts.
    assert out.preempted_ids == ("b",) and chunks(out) == [("a", 5)]
    assert b.spec_token_ids == [] and b.num_computed_tokens == 0
    sched.check_integrity()


def test_prefix_cache_keeps_only_accepted_kv() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, budget=32, enable_prefix_caching=True)
    a = make_request("a", 3)
    runner = FakeRunner(sched, {"a": [11, 12, 13, 90, 91, 92, 93, 94]})
    prefilled(sched, runner, a, 11)
    a.spec_token_ids = [12, 13, 14, 15, 16]  # 14 is wrong: the block of positions 4..7 holds rejected KV
    runner.step()
    assert a.output_token_ids == [11, 12, 13, 90] and a.num_computed_tokens == 6
    cached = [sched.kv.prefix_cache.node_of(b) for b in a.block_ids]
    assert cached[0] is not None and cached[0].tokens == (*a.prompt_token_ids, 11)
    assert cached[1] is None  # positions 4..7: 12, 13 computed, 90 and 91 not yet
    for _ in range(3):
        a.spec_token_ids = [91, 92, 93][:max(0, 16 - a.num_output_tokens - 1)]
        runner.step()  # check_integrity after every step: cached blocks are real tokens' KV
    assert a.output_token_ids[:8] == [11, 12, 13, 90, 91, 92, 93, 94]


def test_update_rejects_tokens_that_are_not_an_accepted_prefix() -> None:
    sched = make_scheduler(budget=16)
    a = make_request("a", 4)
    runner = FakeRunner(sched, {"a": [11]})
    prefilled(sched, runner, a, 11)
    a.spec_token_ids = [12, 13]
    out = sched.schedule()
    bad = ModelOutput(("a",), ((SampledToken(12), SampledToken(77), SampledToken(78)),))
    with pytest.raises(ValueError, match="not an accepted prefix"):
        sched.update(out, bad)
    too_many = ModelOutput(("a",), (tuple(SampledToken(t) for t in (12, 13, 5, 6)),))
    with pytest.raises(ValueError, match="not an accepted prefix"):
        sched.update(out, too_many)
