"""Prometheus metrics for ``GET /metrics`` (prometheus-client, one registry per app).

Two sources:
- latencies are observed by the serving layer per engine request
  (time to first token, inter-token latency, end-to-end latency);
- engine counters and gauges are read from ``StatsCollector.snapshot()`` at
  scrape time by a custom collector, so nothing polls the engine.

Names follow vLLM's (``vllm:`` becomes ``tokenloom:``) so dashboards carry over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenloom.engine.stats import StatsCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The server's registry. ``render()`` gives the Prometheus text exposition."""

    def __init__(self, stats: StatsCollector, num_queued: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "tokenloom:time_to_first_token_seconds", "Time from arrival to the first output token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "tokenloom:inter_token_latency_seconds", "Time between two output deltas of a request.",
            buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            "tokenloom:e2e_request_latency_seconds", "Time from arrival to the last output token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.request_finished = Counter(
            "tokenloom:request_success", "Finished sequences by finish reason; 'abort' counts engine requests "
            "stopped early (client gone, error).",
            ["finished_reason"], registry=self.registry)
        self.registry.register(_EngineStatsCollector(stats, num_queued))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector(Collector):
    def __init__(self, stats: StatsCollector, num_queued: Callable[[], int]) -> None:
        self._stats = stats
        self._num_queued = num_queued

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats.snapshot()
        yield GaugeMetricFamily("tokenloom:num_requests_running", "Sequences in the running batch.",
                                value=s.num_running)
        yield GaugeMetricFamily("tokenloom:num_requests_waiting", "Sequences waiting for the scheduler.",
                                value=s.num_waiting)
        yield GaugeMetricFamily("tokenloom:num_requests_queued",
                                "Requests accepted by the server that have no output yet "
                                "(what --max-queued-requests bounds).", value=self._num_queued())
        yield GaugeMetricFamily("tokenloom:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
                                value=s.kv_cache_usage)
        counters = (
            ("tokenloom:prompt_tokens", "Prompt tokens computed (recompute included).", s.prompt_tokens_total),
            ("tokenloom:generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("tokenloom:num_preemptions", "Sequences preempted for lack of KV blocks.", s.num_preemptions_total),
            ("tokenloom:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries_total),
            ("tokenloom:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits_total),
            ("tokenloom:spec_decode_num_drafts", "Sequence steps that verified draft tokens (speculative decoding).",
             s.spec_decode_drafts_total),
            ("tokenloom:spec_decode_draft_tokens", "Draft tokens verified (speculative decoding).",
             s.spec_decode_draft_tokens_total),
            ("tokenloom:spec_decode_accepted_tokens", "Draft tokens accepted (speculative decoding).",
             s.spec_decode_accepted_tokens_total),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
