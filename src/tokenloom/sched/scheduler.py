"""Scheduler: which tokens of which requests run in the next step.

One rule, no phases: every request has ``num_computed_tokens`` and
``num_tokens`` (prompt + output so far), and each step hands out one token
budget so that computed catches up with total::

    budget 8        running: A (decode)   B (prefill 20, 12 done)   waiting: C (3)
    step            A: 1 token            B: 7 tokens               C: -- (budget spent)

Chunked prefill, decodes mixed with prefills, recompute after preemption,
prefix-cache hits and n > 1 prompt sharing are all this rule plus block
accounting: a hit only starts ``num_computed_tokens`` past the reused blocks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from tokenloom.config import SchedulerConfig
from tokenloom.kv_cache.manager import KVCacheManager
from tokenloom.request import Request, RequestStatus
from tokenloom.sched.output import ModelOutput, SampledToken, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


class Scheduler:
    """FCFS scheduler with one token budget per step (``max_num_batched_tokens``).

    ``schedule()`` serves RUNNING requests first, in admission order (a decode
    gets 1 token, a prefill a chunk of what budget is left), then admits
    WAITING / PREEMPTED requests in queue order while budget and seats
    (``max_num_seqs``) remain. When a running request cannot get blocks, the
    newest running request is preempted by recompute (blocks freed,
    ``num_computed_tokens`` = 0, front of the queue) until the allocation fits;
    a step that preempted admits nobody. An admitted request first takes the
    longest cached prefix of its tokens from the KV cache manager (or its
    running sibling's prompt blocks), always leaving one token to compute so
    there are logits to sample from. ``update()`` applies the model's output:
    computed tokens advance, newly full blocks enter the prefix cache, sampled
    tokens are appended, stop conditions finish requests and free their blocks
    at once.

    Speculative decoding: a decoding request with draft tokens (``spec_token_ids``,
    set by the engine's drafter) asks for 1 + k tokens of the budget (the budget may
    cut the drafts short). ``update()`` appends the accepted drafts and the token
    after them, in order, until a stop condition holds; the KV of rejected drafts is
    dropped (computed = tokens - 1) and the blocks that held only it go back.

    Overlapped (async) scheduling: ``schedule()`` may run once more before the
    ``update()`` of the step in flight. Each request counts what that step will add
    (``num_inflight_tokens``, ``num_inflight_outputs``), so the next step starts past
    it; a sequence whose last token is still being sampled gets it as its first new
    token, read on the device (``token_from_last_step``). ``update()`` drops the
    results of requests finished or preempted meanwhile, and a request whose token in
    flight is certainly its last (max_tokens, max_model_len) is not planned again.

    The engine keeps ``max_model_len <= kv.capacity_tokens``, so a request
    running alone always fits.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}  # every unfinished request
        # Built once per request: ScheduledRequest carries the prompt every step.
        self._prompt_ids: dict[str, tuple[int, ...]] = {}
        self._finished_ids: list[str] = []
        # Requests the last schedule() admitted for the first time (resumes after
        # preemption not included): the engine counts their prefix-cache hits.
        self.first_admissions: list[Request] = []

    # ---- requests in and out ------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Queue ``req`` (FCFS). Raises ValueError if its prompt can never run."""
        prompt_len = req.num_prompt_tokens
        if prompt_len > self.config.max_model_len:
            raise ValueError(f"request {req.request_id}: prompt has {prompt_len} tokens, more than "
                             f"max_model_len ({self.config.max_model_len})")
        if prompt_len > self.kv.capacity_tokens:
            raise ValueError(f"request {req.request_id}: prompt has {prompt_len} tokens, more than "
                             f"the whole KV cache holds ({self.kv.capacity_tokens})")
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in the scheduler")
        if req.status is not RequestStatus.WAITING or req.num_computed_tokens or req.block_ids:
            raise ValueError(f"request {req.request_id} is not new: {req!r}")
        self._requests[req.request_id] = req
        self._prompt_ids[req.request_id] = tuple(req.prompt_token_ids)
        self.waiting.append(req)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests decided outside the model (abort, stop string): their blocks
        are freed now. Unknown and already finished ids are ignored."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for request_id in request_ids:
            req = self._requests.get(request_id)
            if req is None:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._release(req, status)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def can_schedule_ahead(self) -> bool:
        """Whether the next step may be planned before the host knows the tokens of the
        one in flight: not while a sequence waits for one that its sampling reads
        (penalties count its output ids) or that its grammar must accept first."""
        return not any(req.num_inflight_outputs and _reads_own_output(req) for req in self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- schedule -------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        chunks: list[tuple[Request, int]] = []
        preempted: list[str] = []
        self.first_admissions = []
        budget = self._schedule_running(self.config.max_num_batched_tokens, chunks, preempted)
        if not preempted:
            self._schedule_waiting(budget, chunks)
        finished_ids, self._finished_ids = tuple(self._finished_ids), []
        # Built last: block tables are final once every allocation of the step is done.
        scheduled = tuple(self._scheduled_request(req, n) for req, n in chunks)
        for (req, n), sched in zip(chunks, scheduled):
            req.num_inflight_tokens += n
            req.num_inflight_outputs += sched.sample
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=sum(n for _, n in chunks),
            preempted_ids=tuple(preempted),
            finished_ids=finished_ids,
        )

    def _schedule_running(self, budget: int, chunks: list[tuple[Request, int]],
                          preempted: list[str]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._ends_in_flight(req):
                i += 1  # its last token is being sampled: the step in flight finishes it
                continue
            # A decoding sequence's drafts ride along; the budget may cut them short.
            num_drafts = len(req.spec_token_ids) if req.is_decoding else 0
            num_new = min(_num_known_tokens(req) - _num_scheduled_tokens(req) + num_drafts, budget)
            if not self._allocate_or_preempt(req, num_new, preempted):
                break  # req was the newest: nothing runs after it
            chunks.append((req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _ends_in_flight(self, req: Request) -> bool:
        """The token a step in flight samples for ``req`` is certainly its last (max_tokens
        or the context length): scheduling past it would waste a token, or overrun the
        context. (An EOS or stop token cannot be foreseen: that token's step is wasted.)"""
        if not req.num_inflight_outputs:
            return False
        max_tokens = req.sampling_params.max_tokens
        return (max_tokens is not None and req.num_output_tokens + req.num_inflight_outputs >= max_tokens) \
            or _num_known_tokens(req) >= self.config.max_model_len

    def _allocate_or_preempt(self, req: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate, preempting the newest running requests (req itself last) until it fits.
        Victims come from the tail, which holds only requests not yet scheduled this step."""
        while not self.kv.allocate_slots(req, req.num_inflight_tokens + num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        """Its step in flight, if any, is dropped when its result comes (``update``)."""
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_inflight_tokens = req.num_inflight_outputs = 0
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _schedule_waiting(self, budget: int, chunks: list[tuple[Request, int]]) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if req.grammar is not None and (not req.grammar.is_ready or req.grammar.error is not None):
                # Its grammar compiles off the engine thread; nobody waits for it.
                # (A failed compile is finished by the engine.)
                skipped.append(req)
                continue
            sibling = self._running_sibling(req)
            if sibling is not None and sibling.num_computed_tokens < req.num_prompt_tokens - 1:
                # Its prompt blocks become shareable once the sibling's prefill is done.
                skipped.append(req)
                continue
            if sibling is not None:
                self._share_prompt(sibling, req)
            else:
                self.kv.allocate_cached_prefix(req, self._max_cache_hit(req))
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, num_new):
                self.kv.free(req)  # undo a shared or cached prefix; it is taken again next time
                req.num_computed_tokens = 0
                self.waiting.appendleft(req)
                break  # FCFS: nobody behind it jumps the queue for blocks
            self._admit(req)
            chunks.append((req, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _admit(self, req: Request) -> None:
        if req.status is RequestStatus.WAITING:
            # Reported as usage.prompt_tokens_details.cached_tokens: prompt tokens this
            # request did not compute. A resume after preemption that finds its own
            # blocks again is not counted a second time.
            req.num_cached_tokens = req.num_computed_tokens
            self.first_admissions.append(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    @staticmethod
    def _max_cache_hit(req: Request) -> int:
        """How many leading tokens ``req`` may take from the prefix cache."""
        limit = req.num_tokens - 1  # the last token is computed: its logits are sampled
        if req.sampling_params.prompt_logprobs is not None \
                and req.num_prompt_logprobs_done < req.num_prompt_tokens:
            # Reused positions yield no logits, so only what is already collected may be
            # skipped: a chunk from c scores prompt tokens c + 1 .. on (see update()).
            limit = min(limit, max(0, req.num_prompt_logprobs_done - 1))
        return limit

    def _running_sibling(self, req: Request) -> Request | None:
        """The running sequence of the same user request (n > 1) that computed the most."""
        if req.sampling_params.n == 1:
            return None
        siblings = [r for r in self.running if r.parent_id == req.parent_id]
        return max(siblings, key=lambda r: r.num_computed_tokens, default=None)

    def _share_prompt(self, sibling: Request, req: Request) -> None:
        # At least one prompt token is computed again, so there are logits to sample from.
        num_tokens = min(sibling.num_computed_tokens, req.num_prompt_tokens - 1)
        self.kv.share_prefix(sibling, req, num_tokens)
        # Siblings share one SamplingParams, so the sibling (past its prompt) already
        # holds every prompt logprob that the shared positions would have produced.
        if req.num_prompt_logprobs_done < sibling.num_prompt_logprobs_done:
            req.prompt_logprobs = list(sibling.prompt_logprobs)
            req.num_prompt_logprobs_done = sibling.num_prompt_logprobs_done

    def _scheduled_request(self, req: Request, num_new: int) -> ScheduledRequest:
        start = _num_scheduled_tokens(req)
        params = req.sampling_params
        wants_prompt_logprobs = (params.prompt_logprobs is not None
                                 and req.num_prompt_logprobs_done < req.num_prompt_tokens)
        prompt = self._prompt_ids[req.request_id]
        known = _num_known_tokens(req)
        end = min(start + num_new, known)  # past it: drafts
        drafts = tuple(req.spec_token_ids[:start + num_new - end])
        from_last_step = end > req.num_tokens  # the token a step in flight samples
        token_ids = _token_slice(prompt, req.output_token_ids, start, min(end, req.num_tokens))
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=(_STAND_IN,) + token_ids + drafts if from_last_step else token_ids + drafts,
            num_computed_tokens=start,
            num_new_tokens=num_new,
            block_ids=tuple(req.block_ids),
            sample=end == known,
            sampling_params=params,
            prompt_token_ids=prompt,
            output_token_ids=tuple(req.output_token_ids),
            seed=req.seed,
            eos_token_ids=tuple(req.eos_token_ids),
            prompt_logprobs_start=start if wants_prompt_logprobs else None,
            spec_token_ids=drafts,
            token_from_last_step=from_last_step,
        )

    # ---- update ---------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> list[Request]:
        """Apply one step's results. Returns the requests that received a token
        (finished ones included: check ``req.is_finished``)."""
        sampled = _sampled_by_request(scheduler_output, model_output)
        received: list[Request] = []
        for sched in scheduler_output.scheduled:
            req = self._requests.get(sched.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished by the engine (abort, stop string) while the step ran
            if req.num_computed_tokens != sched.num_computed_tokens:
                raise ValueError(f"stale scheduler output for {req.request_id}: scheduled at "
                                 f"{sched.num_computed_tokens} computed tokens, "
                                 f"now {req.num_computed_tokens}")
            req.num_inflight_tokens -= sched.num_new_tokens
            req.num_inflight_outputs -= sched.sample
            self._collect_prompt_logprobs(req, sched, model_output)
            if not sched.sample:
                req.num_computed_tokens += sched.num_new_tokens
                self.kv.cache_full_blocks(req)
                continue
            tokens = sampled[req.request_id]
            _check_accepted(sched, tokens)
            req.spec_token_ids = []
            req.num_draft_tokens += len(sched.spec_token_ids)
            req.num_accepted_tokens += len(tokens) - 1
            status = self._append_tokens(req, tokens)
            # The KV of every fed token up to the last one accepted is valid; the slots of
            # rejected drafts (and of drafts past a stop) are given back.
            req.num_computed_tokens = req.num_tokens - 1
            self.kv.cache_full_blocks(req)
            if status is not None:
                self._release(req, status)
            elif sched.spec_token_ids:
                self.kv.trim(req)
            received.append(req)
        if any(req.is_finished for req in received):
            self.running = [req for req in self.running if not req.is_finished]
        return received

    def _append_tokens(self, req: Request, tokens: tuple[SampledToken, ...]) -> RequestStatus | None:
        """Append in order until a stop condition holds; the tokens after it are dropped."""
        for token in tokens:
            req.output_token_ids.append(token.token_id)
            if req.sampling_params.logprobs is not None:
                if token.logprobs is None:
                    raise ValueError(f"request {req.request_id} asked for logprobs but none came back")
                req.output_logprobs.append(token.logprobs)
            status = self._check_stop(req, token.token_id)
            if status is not None:
                return status
        return None

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        if req.grammar is not None and self._grammar_done(req, token_id):
            return RequestStatus.FINISHED_STOPPED
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and req.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _grammar_done(req: Request, token_id: int) -> bool:
        """Advance the grammar; a complete grammar (or, defensively, a token it refuses,
        which the bitmask makes impossible) ends the output."""
        if not req.grammar.accept(token_id):
            logger.error("request %s: sampled token %d that its grammar refuses; stopping it",
                         req.request_id, token_id)
            return True
        return req.grammar.is_terminated

    def _collect_prompt_logprobs(self, req: Request, sched: ScheduledRequest,
                                 model_output: ModelOutput) -> None:
        """A chunk over prompt positions [c, c + n) yields the logprobs of prompt tokens
        c + 1 .. min(c + n, P - 1) (token j is scored by the logits at j - 1), led by
        a None for token 0 when c == 0. Entries already held (recompute) are dropped."""
        if sched.prompt_logprobs_start is None:
            return
        entries = model_output.prompt_logprobs.get(req.request_id)
        if entries is None:
            raise ValueError(f"request {req.request_id} asked for prompt logprobs but none came back")
        start = sched.num_computed_tokens
        first = 0 if start == 0 else start + 1
        last = min(start + sched.num_new_tokens, req.num_prompt_tokens - 1)
        if len(entries) != max(0, last - first + 1):
            raise ValueError(f"request {req.request_id}: expected prompt logprobs for tokens "
                             f"{first}..{last}, got {len(entries)} entries")
        done = req.num_prompt_logprobs_done
        if first > done:
            raise ValueError(f"request {req.request_id}: prompt logprobs start at token {first} "
                             f"but only {done} are collected")
        if first + len(entries) > done:
            req.prompt_logprobs.extend(entries[done - first:])
            req.num_prompt_logprobs_done = first + len(entries)

    def _release(self, req: Request, status: RequestStatus) -> None:
        """Finish ``req`` (already out of running/waiting, or filtered out by the caller)."""
        req.status = status
        self.kv.free(req)
        del self._requests[req.request_id]
        del self._prompt_ids[req.request_id]
        self._finished_ids.append(req.request_id)

    # ---- invariants -----------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (queues, statuses,
        lengths, and the KV cache manager's block accounting)."""
        live = [*self.running, *self.waiting]
        ids = [req.request_id for req in live]
        if len(set(ids)) != len(ids) or set(ids) != self._requests.keys():
            raise AssertionError(f"running + waiting {sorted(ids)} disagree with the "
                                 f"unfinished requests {sorted(self._requests)}")
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running requests, more than "
                                 f"max_num_seqs ({self.config.max_num_seqs})")
        for req in live:
            if req.num_tokens > self.config.max_model_len:
                raise AssertionError(f"{req.request_id} has {req.num_tokens} tokens, past max_model_len")
        for req in self.running:
            if req.status is not RequestStatus.RUNNING or req.num_computed_tokens >= req.num_tokens:
                raise AssertionError(f"running request in a bad state: {req!r}")
        for req in self.waiting:
            if req.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                raise AssertionError(f"waiting request in a bad state: {req!r}")
            if req.block_ids or req.num_computed_tokens:
                raise AssertionError(f"waiting request holds computed tokens or blocks: {req!r}")
        self.kv.check_integrity(live)


_STAND_IN = 0  # in token_ids, for a token the device fills in (``token_from_last_step``)


def _reads_own_output(req: Request) -> bool:
    params = req.sampling_params
    return req.grammar is not None or params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 \
        or params.frequency_penalty != 0.0


def _num_known_tokens(req: Request) -> int:
    """Prompt + output tokens, counting one a step in flight is sampling."""
    return req.num_tokens + req.num_inflight_outputs


def _num_scheduled_tokens(req: Request) -> int:
    """Tokens whose KV is computed, or will be by the step in flight."""
    return req.num_computed_tokens + req.num_inflight_tokens


def _token_slice(prompt: tuple[int, ...], output: list[int], start: int, end: int) -> tuple[int, ...]:
    """Tokens [start, end) of prompt + output, without building the whole sequence."""
    num_prompt = len(prompt)
    if end <= num_prompt:
        return prompt[start:end]
    if start >= num_prompt:
        return tuple(output[start - num_prompt:end - num_prompt])
    return prompt[start:] + tuple(output[:end - num_prompt])


def _check_accepted(sched: ScheduledRequest, tokens: tuple[SampledToken, ...]) -> None:
    """A step yields one token, plus one per draft accepted: drafts are accepted in order,
    so every token but the last must equal its draft (else the cached KV would be wrong)."""
    drafts = sched.spec_token_ids
    if not 1 <= len(tokens) <= 1 + len(drafts) or any(
            t.token_id != d for t, d in zip(tokens[:-1], drafts)):
        raise ValueError(f"request {sched.request_id}: tokens {[t.token_id for t in tokens]} are not "
                         f"an accepted prefix of drafts {list(drafts)} plus one")


def _sampled_by_request(scheduler_output: SchedulerOutput,
                        model_output: ModelOutput) -> dict[str, tuple[SampledToken, ...]]:
    if len(model_output.request_ids) != len(model_output.sampled):
        raise ValueError(f"model output has {len(model_output.request_ids)} request ids but "
                         f"{len(model_output.sampled)} sampled tokens")
    sampled = dict(zip(model_output.request_ids, model_output.sampled))
    expected = {s.request_id for s in scheduler_output.scheduled if s.sample}
    if sampled.keys() != expected:
        raise ValueError(f"model output sampled {sorted(sampled)} but the step "
                         f"expected {sorted(expected)}")
    return sampled
