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
