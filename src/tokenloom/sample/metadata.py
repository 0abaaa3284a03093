"""SamplingMetadata: the per-step tensors the sampler needs, built once per step.

Only the features some request in the batch uses get tensors; the rest are
None, so an all-greedy batch without extras is a bare argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tokenloom.sampling_params import SamplingParams
from tokenloom.transfer import host_to_device, to_device


class SamplingSequence(Protocol):
    """What the sampler reads from a sequence (``ScheduledRequest`` is one)."""

    @property
    def sampling_params(self) -> SamplingParams: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def output_token_ids(self) -> Sequence[int]: ...
    @property
    def num_output_tokens(self) -> int:
        """Output tokens so far: ``output_token_ids`` and, with overlapped scheduling, the
        one the previous step sampled (still on the device; such a row has no penalties)."""
    @property
    def seed(self) -> int: ...
    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...


@dataclass(frozen=True, slots=True)
class SparseLogitEntries:
    """Sparse (row, token) entries of a [num_seqs, vocab_size] logits tensor."""

    rows: torch.Tensor  # [num_entries] int64
    token_ids: torch.Tensor  # [num_entries] int64
    values: torch.Tensor | None = None  # [num_entries] float32 (logit_bias); None for masks


@dataclass(frozen=True, slots=True)
class AllowedTokens:
    """Structured output: the tokens each constrained row may sample, as a bitmask
    (bit ``t % 32`` of word ``t // 32`` set = token t allowed)."""

    rows: torch.Tensor | None  # [num_masked] int64; None: every row, in order
    bitmask: torch.Tensor  # [num_masked, ceil(vocab_size / 32)] int32


@dataclass(frozen=True, slots=True)
class PenaltyMetadata:
    """Per-row penalties and the token statistics they apply to.

    ``prompt_mask`` exists only when some row has a repetition penalty;
    ``output_counts`` counts output tokens of rows that have any penalty.
    """

    repetition_penalties: torch.Tensor  # [num_seqs] float32, 1.0 = off
    frequency_penalties: torch.Tensor  # [num_seqs] float32, 0.0 = off
    presence_penalties: torch.Tensor  # [num_seqs] float32, 0.0 = off
    output_counts: torch.Tensor  # [num_seqs, vocab_size] int32
    prompt_mask: torch.Tensor | None  # [num_seqs, vocab_size] bool


@dataclass(frozen=True, slots=True)
class DraftSamples:
    """Speculative decoding with a draft model: sample rows (indices among all rows) that
    verify a draft token drawn from the draft model's distribution ``probs`` (q)."""

    rows: list[int]
    token_ids: list[int]
    probs: torch.Tensor  # [len(rows), vocab_size] float32, on the device


@dataclass(frozen=True, slots=True)
class DraftProbs:
    """The random rows (indices among the random rows) that verify a draft-model token
    by rejection sampling, with the token and the distribution it was drawn from."""

    rows: torch.Tensor  # [num_draft_rows] int64
    token_ids: torch.Tensor  # [num_draft_rows] int64
    probs: torch.Tensor  # [num_draft_rows, vocab_size] float32


@dataclass(frozen=True, slots=True)
class RandomRowsMetadata:
    """Parameters of the rows that sample at random (temperature > 0), in batch order.

    ``rows`` indexes them in the batch (None: every row is random). A None filter
    tensor means no random row uses it; ``top_k`` holds vocab_size where top-k is
    off and ``max_top_k`` is the largest enabled k. ``seeds`` and ``positions``
    (output tokens so far) key each row's noise stream. ``draft``: the rows that verify
    a draft model's token (speculative decoding); None when there are none.
    """

    rows: torch.Tensor | None  # [num_random] int64
    temperature: torch.Tensor  # [num_random] float32
    seeds: torch.Tensor  # [num_random] int64
    positions: torch.Tensor  # [num_random] int64
    top_k: torch.Tensor | None  # [num_random] int64
    max_top_k: int
    top_p: torch.Tensor | None  # [num_random] float32
    min_p: torch.Tensor | None  # [num_random] float32
    draft: DraftProbs | None = None


@dataclass(frozen=True, slots=True)
class SamplingMetadata:
    """Everything the sampler needs for one batch of rows (one row per sequence).

    ``random`` is None when every row is greedy; the logit transforms
    (``allowed_tokens``, ``logit_bias``, ``min_tokens_mask``, ``penalties``) are None
    when no row uses them; ``max_num_logprobs`` is None when no row asked for logprobs.
    """

    num_seqs: int
    vocab_size: int
    random: RandomRowsMetadata | None
    logit_bias: SparseLogitEntries | None
    min_tokens_mask: SparseLogitEntries | None
    penalties: PenaltyMetadata | None
    max_num_logprobs: int | None
    allowed_tokens: AllowedTokens | None = None

    @property
    def all_greedy(self) -> bool:
        return self.random is None

    @property
    def all_random(self) -> bool:
        return self.random is not None and self.random.rows is None

    @property
    def no_logit_transforms(self) -> bool:
        """True when the raw logits reach the greedy argmax / temperature untouched."""
        return (self.allowed_tokens is None and self.logit_bias is None and self.min_tokens_mask is None
                and self.penalties is None)


def build_sampling_metadata(
    seqs: Sequence[SamplingSequence], vocab_size: int, device: torch.device | str,
    allowed_tokens: AllowedTokens | None = None, draft: DraftSamples | None = None,
) -> SamplingMetadata:
    """Gather per-row parameters of ``seqs`` into tensors on ``device``
    (``allowed_tokens`` and ``draft``, already built by the caller, are passed through)."""
    params = [s.sampling_params for s in seqs]
    logprobs = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingMetadata(
        num_seqs=len(seqs),
        vocab_size=vocab_size,
        random=_build_random_rows(seqs, vocab_size, device, draft),
        logit_bias=_build_logit_bias(params, device),
        min_tokens_mask=_build_min_tokens_mask(seqs, vocab_size, device),
        penalties=_build_penalties(seqs, vocab_size, device),
        max_num_logprobs=max(logprobs) if logprobs else None,
        allowed_tokens=allowed_tokens,
    )


def _tensor(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return to_device(values, dtype, device)


def _build_random_rows(
    seqs: Sequence[SamplingSequence], vocab_size: int, device: torch.device | str,
    draft: DraftSamples | None = None,
) -> RandomRowsMetadata | None:
    rows = [i for i, s in enumerate(seqs) if not s.sampling_params.greedy]
    if not rows:
        return None
    random_seqs = [seqs[i] for i in rows]
    params = [s.sampling_params for s in random_seqs]
    top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    enabled_k = [k for k in top_k if k < vocab_size]
    return RandomRowsMetadata(
        rows=None if len(rows) == len(seqs) else _tensor(rows, torch.int64, device),
        temperature=_tensor([p.temperature for p in params], torch.float32, device),
        seeds=_tensor([s.seed for s in random_seqs], torch.int64, device),
        positions=_tensor([s.num_output_tokens for s in random_seqs], torch.int64, device),
        top_k=_tensor(top_k, torch.int64, device) if enabled_k else None,
        max_top_k=max(enabled_k, default=0),
        top_p=_optional_row_param([p.top_p for p in params], 1.0, device),
        min_p=_optional_row_param([p.min_p for p in params], 0.0, device),
        draft=_build_draft_probs(rows, draft, device),
    )


def _build_draft_probs(random_rows: list[int], draft: DraftSamples | None,
                       device: torch.device | str) -> DraftProbs | None:
    """``draft``'s rows renumbered among the random rows (its greedy rows verify by argmax)."""
    if draft is None:
        return None
    index_of = {row: i for i, row in enumerate(random_rows)}
    keep = [j for j, row in enumerate(draft.rows) if row in index_of]
    if not keep:
        return None
    return DraftProbs(rows=_tensor([index_of[draft.rows[j]] for j in keep], torch.int64, device),
                      token_ids=_tensor([draft.token_ids[j] for j in keep], torch.int64, device),
                      probs=draft.probs[_tensor(keep, torch.int64, draft.probs.device)])


def _optional_row_param(values: list[float], neutral: float, device: torch.device | str) -> torch.Tensor | None:
    """[num_random] float32, or None when every row has the ``neutral`` (filter off) value."""
    if all(v == neutral for v in values):
        return None
    return _tensor(values, torch.float32, device)


def _build_logit_bias(params: list[SamplingParams], device: torch.device | str) -> SparseLogitEntries | None:
    rows, token_ids, values = [], [], []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            rows.append(row)
            token_ids.append(int(token_id))
            values.append(float(bias))
    if not rows:
        return None
    return SparseLogitEntries(_tensor(rows, torch.int64, device), _tensor(token_ids, torch.int64, device),
                              _tensor(values, torch.float32, device))


def _build_min_tokens_mask(
    seqs: Sequence[SamplingSequence], vocab_size: int, device: torch.device | str
) -> SparseLogitEntries | None:
    rows, token_ids = [], []
    for row, s in enumerate(seqs):
        p = s.sampling_params
        if s.num_output_tokens >= p.min_tokens:
            continue
        # An eos id past the logits' vocabulary (a padded tokenizer) can never be sampled anyway.
        stop_ids = {t for t in (*s.eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab_size}
        rows.extend([row] * len(stop_ids))
        token_ids.extend(sorted(stop_ids))
    if not rows:
        return None
    return SparseLogitEntries(_tensor(rows, torch.int64, device), _tensor(token_ids, torch.int64, device))


def _build_penalties(
    seqs: Sequence[SamplingSequence], vocab_size: int, device: torch.device | str
) -> PenaltyMetadata | None:
    params = [s.sampling_params for s in seqs]
    use_repetition = [p.repetition_penalty != 1.0 for p in params]
    use_any = [r or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
               for r, p in zip(use_repetition, params)]
    if not any(use_any):
        return None
    # Rows without penalties contribute no tokens: their (neutral) penalties never read the counts.
    output_counts = _token_histogram(
        [s.output_token_ids if u else () for s, u in zip(seqs, use_any)], vocab_size, device)
    prompt_mask = None
    if any(use_repetition):
        prompt_mask = _token_histogram(
            [s.prompt_token_ids if u else () for s, u in zip(seqs, use_repetition)], vocab_size, device) > 0
    return PenaltyMetadata(
        repetition_penalties=_tensor([p.repetition_penalty for p in params], torch.float32, device),
        frequency_penalties=_tensor([p.frequency_penalty for p in params], torch.float32, device),
        presence_penalties=_tensor([p.presence_penalty for p in params], torch.float32, device),
        output_counts=output_counts,
        prompt_mask=prompt_mask,
    )


def _token_histogram(
    token_lists: list[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[num_rows, vocab_size] int32 occurrence counts, built with one scatter-add on ``device``."""
    num_rows = len(token_lists)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    flat_ids = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(num_rows), lengths)  # [total_tokens]
    flat_index = host_to_device(rows * vocab_size + flat_ids, device)  # [total_tokens]
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.int32, device=device)
    counts.index_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.int32))
    return counts.view(num_rows, vocab_size)
