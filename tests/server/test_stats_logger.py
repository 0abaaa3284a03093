"""The periodic stats line: rates over the interval, silence when idle."""

from __future__ import annotations

import logging

from tokenloom.engine.stats import StatsCollector
from tokenloom.engine.stats_logger import StatsLogger
from tokenloom.sched.output import SchedulerOutput

EMPTY_STEP = SchedulerOutput(scheduled=(), num_batched_tokens=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_logs_rates_while_busy_and_nothing_when_idle(caplog):
    stats, clock = StatsCollector(), FakeClock()
    stats_logger = StatsLogger(stats, clock)
    clock.now += 2.0
    assert stats_logger.log_if_busy() is None  # nothing ran, nothing waits

    stats.record_step(EMPTY_STEP, num_generated=30, num_running=3, num_waiting=1, kv_cache_usage=0.25)
    stats.record_prefix_cache(queried_tokens=40, hit_tokens=10)
    clock.now += 2.0
    with caplog.at_level(logging.INFO, logger="tokenloom.stats"):
        line = stats_logger.log_if_busy()
    assert line == ("prompt 0.0 tok/s, generation 15.0 tok/s, running 3, waiting 1, KV cache 25.0%, "
                    "prefix cache hit rate 25.0%")
    assert caplog.messages == [line]

    stats.record_step(EMPTY_STEP, num_generated=0, num_running=0, num_waiting=0, kv_cache_usage=0.0)
    clock.now += 2.0
    assert stats_logger.log_if_busy() is None


def test_speculative_decoding_adds_acceptance_to_the_line():
    from tokenloom.sched.output import ModelOutput, SampledToken, ScheduledRequest
    from tokenloom.sampling_params import SamplingParams

    def scheduled(request_id: str, drafts: tuple[int, ...]) -> ScheduledRequest:
        return ScheduledRequest(request_id, (1, *drafts), 5, 1 + len(drafts), (0,), True, SamplingParams(),
                                (1, 2, 3, 4, 5), (), 0, spec_token_ids=drafts)

    stats, clock = StatsCollector(), FakeClock()
    stats_logger = StatsLogger(stats, clock)
    step = SchedulerOutput(scheduled=(scheduled("a", (7, 8, 9, 10)), scheduled("b", (7, 8)), scheduled("c", ())),
                           num_batched_tokens=9)
    tokens = ((SampledToken(7), SampledToken(8), SampledToken(3)), (SampledToken(7), SampledToken(8),
                                                                     SampledToken(9)), (SampledToken(4),))
    stats.record_step(step, num_generated=7, num_running=3, num_waiting=0, kv_cache_usage=0.5)
    stats.record_spec_decode(step, ModelOutput(("a", "b", "c"), tokens))
    clock.now += 1.0
    line = stats_logger.log_if_busy()
    # a: 2 of 4 drafts accepted, b: 2 of 2; c had none. 4 of 6 accepted, (3 + 3) / 2 tokens a verify.
    assert line.endswith("prefix cache hit rate 0.0%, spec decode acceptance 66.7%, mean acceptance length 3.00")
    s = stats.snapshot()
    assert (s.spec_decode_drafts_total, s.spec_decode_draft_tokens_total, s.spec_decode_accepted_tokens_total) == \
        (2, 6, 4)
