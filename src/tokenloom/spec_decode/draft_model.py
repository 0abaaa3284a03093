"""Draft-model proposer: a smaller model of the same vocabulary drafts k tokens.

It runs on the engine's thread, with its own ModelRunner and its own paged KV
cache. Each target sequence has a shadow sequence here that shares its prompt
and output token lists; only the draft's block table and computed count are
its own. One ``propose`` is a catch-up (the tokens the draft has not seen: a new
sequence's prompt, then the tokens the last step accepted; forwards within the
token budget) that samples the first draft, then one decode forward per further
draft::

    target tokens    ... t[N-1]                    (N known tokens)
    catch-up         feed t[c .. N-1]        -> d1
    round r          feed d_r at N - 1 + r   -> d_(r+1)

After the target's verify step, the draft's KV stays valid up to the drafts the
target accepted (the fed drafts that match the sequence's tokens now); the rest
is rolled back and its blocks freed.

A draft token is sampled from the draft's distribution q with the sequence's own
sampling settings, from a random stream apart from the target's (a salted
seed); ``draft_probs`` hands q of the random rows to the verify step, whose
rejection sampling keeps the target's distribution exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenloom.config import ModelArchConfig
from tokenloom.kv_cache.manager import KVCacheManager
from tokenloom.request import Request
from tokenloom.runner.model_runner import ModelRunner
from tokenloom.sample import build_sampling_metadata
from tokenloom.sample.sampler import sample_with_probs
from tokenloom.sched.output import ScheduledRequest, SchedulerOutput
from tokenloom.spec_decode.verify import num_accepted
from tokenloom.transfer import to_host

_DRAFT_SEED_SALT = 0x5DEECE66D  # the draft's random stream is not the target's


@dataclass(slots=True)
class _Shadow:
    """The draft's view of one target sequence."""

    request: Request  # shares the target's token lists; its own blocks and computed count
    fed_start: int = 0  # the drafts fed last time sat at positions fed_start ..
    fed: tuple[int, ...] = ()


class DraftModelProposer:
    def __init__(self, model: torch.nn.Module, arch: ModelArchConfig, num_blocks: int, block_size: int,
                 kv_cache_dtype: torch.dtype, device: torch.device, max_num_seqs: int, max_model_len: int,
                 max_num_batched_tokens: int) -> None:
        self.runner = ModelRunner(model, arch, num_blocks, block_size, kv_cache_dtype, device,
                                  max_num_seqs, max_model_len)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.vocab_size = arch.vocab_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self._shadows: dict[str, _Shadow] = {}
        self._released: list[str] = []  # shadows let go since the last forward (their table rows)
        self._probs: dict[str, torch.Tensor] = {}

    # ---- the Drafter's interface ----------------------------------------------

    def retain(self, request_ids: set[str]) -> None:
        """Let go of the sequences that no longer run (finished, aborted, preempted)."""
        for request_id in [r for r in self._shadows if r not in request_ids]:
            self.kv.free(self._shadows.pop(request_id).request)
            self._released.append(request_id)
        self._probs = {}

    def draft_probs(self) -> dict[str, torch.Tensor]:
        """q [k, vocab] of the last proposal, for the sequences that sample at random."""
        return self._probs

    @torch.inference_mode()
    def propose(self, requests: Sequence[Request], num_drafts: Sequence[int]) -> list[list[int]]:
        """Up to ``num_drafts[i]`` drafts for ``requests[i]`` (none where the draft's KV
        cache has no room for them)."""
        shadows = [self._shadow(req) for req in requests]
        caps = [cap if self._allocate(s, cap) else 0 for s, cap in zip(shadows, num_drafts)]
        active = [(s, cap) for s, cap in zip(shadows, caps) if cap > 0]
        drafts: dict[str, list[int]] = {s.request.request_id: [] for s, _ in active}
        probs: dict[str, list[torch.Tensor]] = {s.request.request_id: [] for s, _ in active}
        for step in self._catch_up([s for s, _ in active]):
            self._sample(step, drafts, probs)  # d1
        for r in range(1, max((cap for _, cap in active), default=0)):
            self._sample([self._scheduled(s, (drafts[s.request.request_id][-1],), drafts[s.request.request_id][:-1])
                          for s, cap in active if cap > r], drafts, probs)
        self._probs = {rid: torch.stack(rows) for rid, rows in probs.items() if rows}
        for s, cap in active:
            own = drafts[s.request.request_id]
            s.fed_start, s.fed = s.request.num_tokens, tuple(own[:cap - 1])
            s.request.num_computed_tokens = s.request.num_tokens + len(s.fed)
        return [drafts.get(s.request.request_id, []) for s in shadows]

    # ---- internals ---------------------------------------------------------------

    def _shadow(self, req: Request) -> _Shadow:
        """The sequence's shadow, its KV rolled back to what the target kept."""
        shadow = self._shadows.get(req.request_id)
        if shadow is None:
            twin = Request(req.request_id, req.prompt_token_ids, req.sampling_params, req.eos_token_ids,
                           seed=(req.seed ^ _DRAFT_SEED_SALT) % 2**63)
            twin.output_token_ids = req.output_token_ids  # the same list: tokens are the target's
            shadow = self._shadows[req.request_id] = _Shadow(twin)
            return shadow
        twin = shadow.request
        tokens = twin.all_token_ids[shadow.fed_start:shadow.fed_start + len(shadow.fed)]
        kept = num_accepted(tokens, shadow.fed)  # the fed drafts the sequence kept
        # At least the last token is fed again, even when the target did not advance: it samples d1.
        twin.num_computed_tokens = min(twin.num_computed_tokens, shadow.fed_start + kept, twin.num_tokens - 1)
        shadow.fed = ()
        self.kv.trim(twin)
        return shadow

    def _allocate(self, shadow: _Shadow, cap: int) -> bool:
        """Slots for the catch-up and the cap - 1 drafts fed after it."""
        twin = shadow.request
        return cap > 0 and self.kv.allocate_slots(twin, twin.num_tokens - twin.num_computed_tokens + cap - 1)

    def _catch_up(self, shadows: list[_Shadow]) -> list[list[ScheduledRequest]]:
        """Feed what the draft has not seen, in forwards of at most the token budget (a
        sequence with more runs its head first, sampling nothing); returns the steps of
        the chunks that reach each sequence's end, packed within the budget (they sample d1)."""
        budget = self.max_num_batched_tokens
        for s in shadows:
            twin = s.request
            while twin.num_tokens - twin.num_computed_tokens > budget:
                self.runner.forward(self._step([self._chunk(twin, budget)]))
                twin.num_computed_tokens += budget
        steps: list[list[ScheduledRequest]] = []
        used = budget
        for s in shadows:
            chunk = self._chunk(s.request, s.request.num_tokens - s.request.num_computed_tokens)
            if used + chunk.num_new_tokens > budget:
                steps.append([])
                used = 0
            steps[-1].append(chunk)
            used += chunk.num_new_tokens
        return steps

    def _chunk(self, twin: Request, n: int) -> ScheduledRequest:
        start = twin.num_computed_tokens
        return self._scheduled_at(twin, tuple(twin.all_token_ids[start:start + n]), start, ())

    def _scheduled(self, shadow: _Shadow, token_ids: tuple[int, ...], earlier: list[int]) -> ScheduledRequest:
        """Round r: feed the last draft; its history holds the drafts before it."""
        twin = shadow.request
        return self._scheduled_at(twin, token_ids, twin.num_tokens + len(earlier), tuple(earlier) + token_ids)

    def _scheduled_at(self, twin: Request, token_ids: tuple[int, ...], start: int,
                      drafts_so_far: tuple[int, ...]) -> ScheduledRequest:
        end = start + len(token_ids)
        return ScheduledRequest(
            request_id=twin.request_id, token_ids=token_ids, num_computed_tokens=start,
            num_new_tokens=len(token_ids), block_ids=tuple(twin.block_ids),
            sample=end >= twin.num_tokens, sampling_params=twin.sampling_params,
            prompt_token_ids=tuple(twin.prompt_token_ids),
            output_token_ids=tuple(twin.output_token_ids) + drafts_so_far, seed=twin.seed,
            eos_token_ids=twin.eos_token_ids)

    def _step(self, scheduled: list[ScheduledRequest]) -> SchedulerOutput:
        finished, self._released = tuple(self._released), []
        return SchedulerOutput(scheduled=tuple(scheduled), num_batched_tokens=sum(s.num_new_tokens for s in scheduled),
                               finished_ids=finished)

    def _sample(self, step: list[ScheduledRequest], drafts: dict[str, list[int]],
                probs: dict[str, list[torch.Tensor]]) -> None:
        """One forward; every sequence in it gains a draft (and q, where it samples at random)."""
        inputs, _, logits = self.runner.forward(self._step(step))
        meta = build_sampling_metadata(inputs.sample_seqs, self.vocab_size, self.runner.device)
        token_ids, random_probs = sample_with_probs(logits, meta)
        random_rows = [i for i, sr in enumerate(inputs.sampled) if not sr.sampling_params.greedy]
        for row, sr in zip(to_host([token_ids])[0].tolist(), inputs.sampled):
            drafts[sr.request_id].append(row)
        for j, i in enumerate(random_rows):
            probs[inputs.sampled[i].request_id].append(random_probs[j])
