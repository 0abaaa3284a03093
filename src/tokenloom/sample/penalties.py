"""Logit transforms that read the request's history: the grammar's allowed tokens,
logit_bias, min_tokens, penalties.

Each function takes logits [num_seqs, vocab_size] float32 that it may modify
in place (the sampler hands them its own working copy) and returns the result;
callers use the returned tensor.
"""

from __future__ import annotations

import torch

from tokenloom.sample.metadata import AllowedTokens, PenaltyMetadata, SparseLogitEntries

_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_allowed_tokens(logits: torch.Tensor, allowed: AllowedTokens) -> torch.Tensor:
    """Structured output: tokens the row's grammar refuses -> -inf."""
    num_rows, vocab_size = allowed.bitmask.shape[0], logits.shape[-1]
    shifts = _BIT_SHIFTS.to(allowed.bitmask.device)
    bits = (allowed.bitmask.unsqueeze(-1) >> shifts) & 1  # [num_masked, words, 32]
    refused = bits.view(num_rows, -1)[:, :vocab_size] == 0  # [num_masked, vocab_size]
    if allowed.rows is None:
        return logits.masked_fill_(refused, float("-inf"))
    masked = logits.index_select(0, allowed.rows).masked_fill_(refused, float("-inf"))
    return logits.index_copy_(0, allowed.rows, masked)


def apply_logit_bias(logits: torch.Tensor, bias: SparseLogitEntries) -> torch.Tensor:
    """Add each row's OpenAI ``logit_bias`` to the named tokens."""
    assert bias.values is not None
    logits.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)
    return logits


def apply_min_tokens(logits: torch.Tensor, mask: SparseLogitEntries) -> torch.Tensor:
    """Forbid eos and stop token ids on rows that have not yet produced ``min_tokens``."""
    logits[mask.rows, mask.token_ids] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, penalties: PenaltyMetadata) -> torch.Tensor:
    """Repetition (HF / vLLM), then frequency and presence (OpenAI) penalties.

    repetition: for tokens seen in the prompt OR the output, positive logits are
    divided by the penalty and negative ones multiplied, so a penalty > 1 always
    makes a seen token less likely.
    frequency / presence: ``logit -= frequency * count + presence * (count > 0)``
    where count is the token's occurrences in the OUTPUT only, as OpenAI defines it.
    """
    counts = penalties.output_counts  # [num_seqs, vocab_size]
    output_mask = counts > 0  # [num_seqs, vocab_size]
    if penalties.prompt_mask is not None:
        seen = penalties.prompt_mask | output_mask  # [num_seqs, vocab_size]
        rep = penalties.repetition_penalties[:, None].expand_as(logits)
        scale = torch.where(seen, rep, 1.0)  # [num_seqs, vocab_size]
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    logits -= penalties.frequency_penalties[:, None] * counts
    logits -= penalties.presence_penalties[:, None] * output_mask
    return logits
