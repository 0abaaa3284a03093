"""Serving metrics from recorded stream timestamps: pure functions, no I/O.

One streamed request is recorded as the time it was sent, the arrival time of
every chunk that carried output text, and the time the stream ended::

    start          chunk[0]     chunk[1]  ...  chunk[-1]    end
      |---- TTFT ----|--- ITL ---|              |            |
      |------------------------- e2e latency ----------------|

TTFT is ``chunk[0] - start``; inter-token latencies (ITL) are the gaps between
consecutive chunks; time per output token (TPOT) spreads the decode time over
the tokens after the first: ``(chunk[-1] - chunk[0]) / (output_len - 1)``. A
chunk may carry more than one token, so ITL counts chunks while TPOT counts
tokens; the two agree when a server streams one token per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the load generator saw it; times in seconds on one monotonic clock."""

    prompt_len: int
    output_len: int  # output tokens the server produced (its usage count, else retokenized)
    start: float
    chunk_times: tuple[float, ...]  # arrival of each chunk that carried output text
    end: float
    error: str | None = None
    # Which prompt of its level's batch this was (records arrive in completion order);
    # None only in result files written before it was recorded.
    prompt_index: int | None = None
    text: str | None = None  # the streamed output, kept with ``bench serve --save-texts``

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_len - 1)

    @property
    def e2e_latency(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Distribution:
    """Mean and percentiles of one latency, in milliseconds; all NaN when there were no samples."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int


@dataclass(frozen=True, slots=True)
class LevelSummary:
    """What one load level achieved: rates per second of wall time, latencies in ms."""

    duration_s: float
    num_completed: int
    num_errors: int
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output) tokens / s
    ttft_ms: Distribution
    itl_ms: Distribution
    tpot_ms: Distribution
    e2e_latency_ms: Distribution


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: Sequence[float]) -> Distribution:
    """Mean and percentiles of latencies given in seconds, reported in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms) if ms else math.nan
    p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
    return Distribution(mean=mean, p50=p50, p90=p90, p99=p99, count=len(ms))


def summarize_level(records: Sequence[RequestRecord], duration_s: float) -> LevelSummary:
    """Summary of one level from its records and the wall time it took."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    done = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    tpots = [t for t in (r.tpot for r in done) if t is not None]
    return LevelSummary(
        duration_s=duration_s,
        num_completed=len(done),
        num_errors=len(records) - len(done),
        total_prompt_tokens=prompt_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(prompt_tokens + output_tokens) / duration_s,
        ttft_ms=distribution_ms([r.ttft for r in done]),
        itl_ms=distribution_ms([gap for r in done for gap in r.itls]),
        tpot_ms=distribution_ms(tpots),
        e2e_latency_ms=distribution_ms([r.e2e_latency for r in done]),
    )
