"""Sampler: logits -> next token ids (and logprobs), for a whole batch at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenloom.sample.filters import apply_min_p, apply_top_k, apply_top_k_top_p
from tokenloom.sample.logprobs import gather_logprobs
from tokenloom.sample.metadata import RandomRowsMetadata, SamplingMetadata
from tokenloom.sample.noise import exponential_noise, uniform_noise
from tokenloom.spec_decode.rejection import rejection_sample
from tokenloom.sample.penalties import apply_allowed_tokens, apply_logit_bias, apply_min_tokens, apply_penalties


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """One sampled token per row; the logprob fields exist when some row asked for logprobs.

    Logprob rows have 1 + max_k columns (col 0: the sampled token, then the
    top-k by descending logprob); a row that asked for fewer than max_k simply
    reads fewer columns. ``sampled_ranks``: 1 = the most likely token.
    """

    token_ids: torch.Tensor  # [num_seqs] int64
    logprob_token_ids: torch.Tensor | None = None  # [num_seqs, 1 + max_k] int64
    logprobs: torch.Tensor | None = None  # [num_seqs, 1 + max_k] float32
    sampled_ranks: torch.Tensor | None = None  # [num_seqs] int64


class Sampler(nn.Module):
    """Turns logits [num_seqs, vocab_size] into one token per row, in this order:

    0. allowed tokens  - structured output: what the request's grammar refuses is
                         -inf before anything else, so no bias, penalty or filter
                         can bring it back (and a greedy row takes the best
                         token the grammar allows);
    1. logit_bias      - the user's explicit edit of the model's scores comes first,
                         so every later step sees the distribution the user asked for;
    2. min_tokens      - eos / stop ids -> -inf before penalties, so no penalty or
                         bias can make a forbidden token win again;
    3. penalties       - repetition (prompt + output), frequency and presence (output);
                         they act on scores, before any distribution is formed;
    4. greedy argmax   - temperature 0 rows stop here: temperature and the truncation
                         filters cannot change the argmax, so they are skipped;
    5. temperature     - reshapes the distribution the filters then cut;
    6. top-k, 7. top-p - top-p measures mass over the top-k survivors (one shared sort);
    8. min-p           - relative to the max prob, so it commutes with top-k and
                         only needs to come after top-p, whose renormalised mass it
                         would otherwise change;
    9. random draw     - argmax(probs / E) with E ~ Exp(1) drawn from the row's own
                         counter-based stream (``noise.py``): the same seed gives the
                         same tokens whatever the batch, with no torch.Generator.
                         A row that verifies a draft model's token takes it or a
                         residual draw by rejection sampling (``spec_decode``).

    Logprobs are computed from the RAW model logits (log_softmax before any
    transform), as vLLM v1 does by default: they describe the model, not the
    sampling settings. The input logits are never modified.
    """

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        return sample(logits, metadata)


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
    """The Sampler as a pure function (see ``Sampler`` for the order of transforms)."""
    logits = logits.to(torch.float32)
    token_ids = _sample_token_ids(logits, metadata)  # [num_seqs]
    if metadata.max_num_logprobs is None:
        return SamplerOutput(token_ids)
    raw_logprobs = logits.log_softmax(dim=-1)  # [num_seqs, vocab_size]
    ids, logprobs, ranks = gather_logprobs(raw_logprobs, token_ids, metadata.max_num_logprobs)
    return SamplerOutput(token_ids, ids, logprobs, ranks)


def _sample_token_ids(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    return _draw(logits, metadata, keep_probs=False)[0]


def sample_with_probs(logits: torch.Tensor, metadata: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids [num_seqs] and, for the random rows, the distribution each was drawn from
    [num_random, vocab_size] (None when all rows are greedy): what a draft model's
    proposals need for rejection sampling. The same transforms and draw as ``sample``."""
    return _draw(logits.to(torch.float32), metadata, keep_probs=True)


def _draw(logits: torch.Tensor, metadata: SamplingMetadata,
          keep_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not metadata.no_logit_transforms:
        logits = _apply_history_transforms(logits.clone(), metadata)
    random = metadata.random
    if random is None:
        return logits.argmax(dim=-1), None
    if random.rows is None:
        return _sample_random(logits, random, keep_probs)
    token_ids = logits.argmax(dim=-1)  # [num_seqs], greedy rows keep theirs
    random_ids, probs = _sample_random(logits.index_select(0, random.rows), random, keep_probs)
    return token_ids.index_copy_(0, random.rows, random_ids), probs


def _apply_history_transforms(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Steps 0-3, in place on the sampler's working copy."""
    if metadata.allowed_tokens is not None:
        logits = apply_allowed_tokens(logits, metadata.allowed_tokens)
    if metadata.logit_bias is not None:
        logits = apply_logit_bias(logits, metadata.logit_bias)
    if metadata.min_tokens_mask is not None:
        logits = apply_min_tokens(logits, metadata.min_tokens_mask)
    if metadata.penalties is not None:
        logits = apply_penalties(logits, metadata.penalties)
    return logits


def _sample_random(logits: torch.Tensor, random: RandomRowsMetadata,
                   keep_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 5-9 on the random rows' logits [num_random, vocab_size]: token ids [num_random]
    int64, and the probabilities they were drawn from when ``keep_probs``."""
    probs = random_probs(logits, random)  # [num_random, vocab_size]
    noise = exponential_noise(random.seeds, random.positions, logits.shape[-1])  # [num_random, vocab_size]
    weights = probs / noise if keep_probs or random.draft is not None else probs.div_(noise)
    token_ids = weights.argmax(dim=-1)  # [num_random]
    draft = random.draft
    if draft is not None:
        verified = rejection_sample(probs[draft.rows], draft.probs, draft.token_ids,
                                    uniform_noise(random.seeds[draft.rows], random.positions[draft.rows]),
                                    noise[draft.rows])  # [num_draft_rows]
        token_ids.index_copy_(0, draft.rows, verified)
    return token_ids, probs if keep_probs else None


def random_probs(logits: torch.Tensor, random: RandomRowsMetadata) -> torch.Tensor:
    """Steps 5-8: the distribution the random rows draw from, [num_random, vocab_size] float32."""
    logits = logits / random.temperature[:, None]  # a new tensor: the filters below work in place
    if random.top_p is not None:
        logits = apply_top_k_top_p(logits, random.top_k, random.max_top_k, random.top_p)
    elif random.top_k is not None:
        logits = apply_top_k(logits, random.top_k, random.max_top_k)
    if random.min_p is not None:
        logits = apply_min_p(logits, random.min_p)
    return logits.softmax(dim=-1)
