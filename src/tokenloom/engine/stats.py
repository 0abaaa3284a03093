"""Engine counters: what the periodic log line and /metrics report.

The engine thread updates them once per step; readers on other threads take
a ``snapshot()`` (a frozen copy), so they never see a half-updated step.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from tokenloom.sched.output import ModelOutput, SchedulerOutput


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prompt_tokens_total: int = 0  # prompt tokens computed (recomputation after preemption included)
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    num_steps_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens found cached
    spec_decode_drafts_total: int = 0  # sequence-steps that verified drafts
    spec_decode_draft_tokens_total: int = 0  # draft tokens verified
    spec_decode_accepted_tokens_total: int = 0  # of those, accepted


class StatsCollector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = EngineStats()

    def snapshot(self) -> EngineStats:
        with self._lock:
            return self._stats

    def record_step(self, out: SchedulerOutput, num_generated: int, num_running: int,
                    num_waiting: int, kv_cache_usage: float) -> None:
        prompt_tokens = sum(max(0, min(s.context_len, len(s.prompt_token_ids)) - s.num_computed_tokens)
                            for s in out.scheduled)
        with self._lock:
            s = self._stats
            self._stats = dataclasses.replace(
                s,
                num_running=num_running,
                num_waiting=num_waiting,
                kv_cache_usage=kv_cache_usage,
                prompt_tokens_total=s.prompt_tokens_total + prompt_tokens,
                generation_tokens_total=s.generation_tokens_total + num_generated,
                num_preemptions_total=s.num_preemptions_total + len(out.preempted_ids),
                num_steps_total=s.num_steps_total + (1 if out.scheduled else 0),
            )

    def record_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        with self._lock:
            s = self._stats
            self._stats = dataclasses.replace(
                s,
                prefix_cache_queries_total=s.prefix_cache_queries_total + queried_tokens,
                prefix_cache_hits_total=s.prefix_cache_hits_total + hit_tokens,
            )

    def record_spec_decode(self, out: SchedulerOutput, model_out: ModelOutput) -> None:
        """Drafts verified this step and how many were accepted (before any stop cut the output)."""
        tokens_of = dict(zip(model_out.request_ids, model_out.sampled))
        verified = [(len(s.spec_token_ids), len(tokens_of[s.request_id]) - 1) for s in out.scheduled
                    if s.spec_token_ids and s.request_id in tokens_of]
        if not verified:
            return
        with self._lock:
            s = self._stats
            self._stats = dataclasses.replace(
                s,
                spec_decode_drafts_total=s.spec_decode_drafts_total + len(verified),
                spec_decode_draft_tokens_total=s.spec_decode_draft_tokens_total + sum(d for d, _ in verified),
                spec_decode_accepted_tokens_total=s.spec_decode_accepted_tokens_total + sum(a for _, a in verified),
            )
