"""Request (the engine's mutable record of one sequence) and the outputs callers receive.

A Request is one sequence: a user request with ``n > 1`` becomes n Requests
(``sample_index`` 0..n-1) that share the prompt's KV blocks by ref count.
The scheduler's one rule: every step, ``num_computed_tokens`` catches up with
``num_tokens`` (prompt + output so far) within the token budget.
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass
from typing import Protocol

from tokenloom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


class OutputGrammar(Protocol):
    """What the scheduler asks of a sequence's structured-output grammar
    (``tokenloom.structured.SequenceGrammar`` is one)."""

    @property
    def is_ready(self) -> bool: ...  # compiled, or failed
    @property
    def error(self) -> str | None: ...
    @property
    def is_terminated(self) -> bool: ...
    def accept(self, token_id: int) -> bool: ...
    def num_valid(self, token_ids: list[int]) -> int: ...


class Request:
    """One sequence being generated.

    ``block_ids`` is its block table: block i holds the KV of tokens
    [i * block_size, (i + 1) * block_size). Only the KV cache manager changes it.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        sample_index: int = 0,
        parent_id: str | None = None,
        seed: int | None = None,
        grammar: OutputGrammar | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.sample_index = sample_index
        # The user-facing request this sequence belongs to (n > 1 fans out).
        self.parent_id = parent_id if parent_id is not None else request_id
        # Each sequence samples from its own counter-based random stream, so the
        # same seed gives the same text whatever else is in the batch.
        if seed is None:
            user_seed = sampling_params.seed
            seed = (user_seed + sample_index) % 2**63 if user_seed is not None else random.getrandbits(63)
        self.seed = seed
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Prompt tokens whose KV came from the prefix cache (or a sibling) instead of compute.
        self.num_cached_tokens = 0
        # Prompt logprobs are gathered once, on the first pass over the prompt.
        self.num_prompt_logprobs_done = 0
        # Filled by the scheduler when sampling_params asks for (prompt) logprobs.
        self.output_logprobs: list[PositionLogprobs] = []
        self.prompt_logprobs: list[PositionLogprobs | None] = []
        # Structured output: the grammar its tokens follow (None: unconstrained).
        self.grammar = grammar
        # Speculative decoding: tokens proposed to follow output_token_ids, verified by the
        # next step that runs this sequence (set by the engine, dropped on preemption).
        self.spec_token_ids: list[int] = []
        self.num_draft_tokens = 0  # drafts verified for this sequence so far
        self.num_accepted_tokens = 0  # of those, accepted
        # Overlapped scheduling: what a scheduled step whose results are not applied yet
        # will add: computed tokens, and a sampled token (0 or 1) the host does not know yet.
        self.num_inflight_tokens = 0
        self.num_inflight_outputs = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_decoding(self) -> bool:
        """Every known token but the last sampled one has its KV computed."""
        return self.num_computed_tokens == self.num_tokens - 1

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={self.block_ids})")


@dataclass(frozen=True, slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


# token id -> Logprob, for one position (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request. In a streamed delta, ``text``/``token_ids`` are new since the last delta."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # the request failed before it ran (its grammar did not compile)


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a streamed delta into the accumulated output of its request (None: the first delta).
    The accumulated output owns its lists; ``delta`` is left as it was."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False)
    by_index = {c.index: c for c in acc.outputs}
    for part in delta.outputs:
        whole = by_index.setdefault(part.index, CompletionOutput(part.index, "", []))
        whole.text += part.text
        whole.token_ids = whole.token_ids + part.token_ids
        if part.logprobs is not None:
            whole.logprobs = (whole.logprobs or []) + part.logprobs
        whole.cumulative_logprob = part.cumulative_logprob
        whole.finish_reason = part.finish_reason
        whole.stop_reason = part.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    acc.num_cached_tokens = max(acc.num_cached_tokens, delta.num_cached_tokens)
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    acc.error = delta.error or acc.error
    return acc
