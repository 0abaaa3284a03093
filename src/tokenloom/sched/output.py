"""What crosses scheduler -> runner and runner -> scheduler: plain data only."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenloom.request import PositionLogprobs
from tokenloom.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One sequence's share of a step: compute tokens
    [num_computed_tokens, num_computed_tokens + num_new_tokens) of ``token_ids``.

    ``sample`` is True when this chunk reaches the end of the known tokens, so the
    last position's logits produce the next token. ``prompt_logprobs_start`` is
    the first prompt position whose logprobs this step must return (None: none).

    With speculative decoding, a decoding sequence also feeds its draft tokens:
    ``token_ids`` ends with ``spec_token_ids`` and the last ``1 + len(spec_token_ids)``
    positions all sample (each verifies the draft after it; the last one is the bonus)::

        token_ids   [ last sampled | d1 | d2 | d3 ]      sample rows: all four
        verifies        d1           d2   d3   (bonus)
    """

    request_id: str
    token_ids: tuple[int, ...]  # the new tokens to feed, len == num_new_tokens
    num_computed_tokens: int
    num_new_tokens: int
    block_ids: tuple[int, ...]
    sample: bool
    sampling_params: SamplingParams
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    seed: int  # per-sequence sampling seed (user seed + sample index, or a random one)
    eos_token_ids: tuple[int, ...] = ()
    prompt_logprobs_start: int | None = None
    spec_token_ids: tuple[int, ...] = ()
    # Overlapped scheduling: the sequence's last sampled token comes from the step before,
    # whose result the host has not seen: it is the first new token, read on the device
    # (``token_ids`` starts with a stand-in for it), and ``output_token_ids`` lacks it.
    token_from_last_step: bool = False

    @property
    def context_len(self) -> int:
        """Tokens with KV in the cache once this step has run (drafts included)."""
        return self.num_computed_tokens + self.num_new_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens before this step's sample, the one still on the device included
        (what the random stream's position and min_tokens count)."""
        return len(self.output_token_ids) + self.token_from_last_step

    @property
    def num_sample_rows(self) -> int:
        """Positions whose logits are sampled: 0, 1, or 1 + the drafts."""
        return 1 + len(self.spec_token_ids) if self.sample else 0


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    num_batched_tokens: int
    preempted_ids: tuple[str, ...] = ()
    finished_ids: tuple[str, ...] = ()  # finished since last step (blocks already freed)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprobs: PositionLogprobs | None = None  # sampled token + top-k, when asked


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """Runner -> scheduler. ``sampled[i]`` belongs to ``request_ids[i]`` (only requests
    whose ScheduledRequest had ``sample=True``): the tokens it gained this step, in
    order: one, or with speculation the accepted drafts and the token after them.
    ``prompt_logprobs`` holds, per request that asked, the entries for the prompt
    positions computed this step."""

    request_ids: tuple[str, ...] = ()
    sampled: tuple[tuple[SampledToken, ...], ...] = ()
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)
