"""The periodic log line while the engine is busy.

Reads ``StatsCollector`` snapshots (frozen copies, safe from any thread) and
turns the difference between two of them into rates::

    prompt 812.4 tok/s, generation 96.0 tok/s, running 4, waiting 1,
    KV cache 37.5%, prefix cache hit rate 42.0%[, spec decode acceptance 61.0%,
    mean acceptance length 3.44]

An idle engine logs nothing, so a quiet server keeps a quiet log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tokenloom.engine.stats import EngineStats, StatsCollector

logger = logging.getLogger("tokenloom.stats")


class StatsLogger:
    """Call ``log_if_busy()`` every interval; it logs (and returns) one line when
    something ran since the previous call or requests are still in flight."""

    def __init__(self, stats: StatsCollector, clock: Callable[[], float] = time.monotonic) -> None:
        self._stats = stats
        self._clock = clock
        self._last = stats.snapshot()
        self._last_time = clock()

    def log_if_busy(self) -> str | None:
        now, current = self._clock(), self._stats.snapshot()
        previous, elapsed = self._last, max(now - self._last_time, 1e-9)
        self._last, self._last_time = current, now
        if not _was_busy(previous, current):
            return None
        line = format_stats_line(previous, current, elapsed)
        logger.info(line)
        return line


def _was_busy(previous: EngineStats, current: EngineStats) -> bool:
    return (current.num_running + current.num_waiting > 0
            or current.num_steps_total != previous.num_steps_total)


def format_stats_line(previous: EngineStats, current: EngineStats, elapsed_s: float) -> str:
    prompt_rate = (current.prompt_tokens_total - previous.prompt_tokens_total) / elapsed_s
    generation_rate = (current.generation_tokens_total - previous.generation_tokens_total) / elapsed_s
    queries = current.prefix_cache_queries_total - previous.prefix_cache_queries_total
    hits = current.prefix_cache_hits_total - previous.prefix_cache_hits_total
    hit_rate = 100.0 * hits / queries if queries else 0.0
    line = (f"prompt {prompt_rate:.1f} tok/s, generation {generation_rate:.1f} tok/s, "
            f"running {current.num_running}, waiting {current.num_waiting}, "
            f"KV cache {100.0 * current.kv_cache_usage:.1f}%, prefix cache hit rate {hit_rate:.1f}%")
    drafts = current.spec_decode_drafts_total - previous.spec_decode_drafts_total
    if drafts:
        draft_tokens = current.spec_decode_draft_tokens_total - previous.spec_decode_draft_tokens_total
        accepted = current.spec_decode_accepted_tokens_total - previous.spec_decode_accepted_tokens_total
        # Tokens a verify step gave a sequence: its accepted drafts plus the target's own token.
        line += (f", spec decode acceptance {100.0 * accepted / max(draft_tokens, 1):.1f}%, "
                 f"mean acceptance length {1 + accepted / drafts:.2f}")
    return line
