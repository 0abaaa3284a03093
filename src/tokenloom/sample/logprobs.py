"""Logprobs of chosen tokens plus the top-k alternatives, for sampled and prompt tokens.

Layout of one row (the same for sampled tokens and prompt positions):

    col:       0           1 .. k
    ids:     [ chosen,     top-1, top-2, ..., top-k ]   (top ids by descending logprob)
    logprobs:[ lp(chosen), lp(top-1), ...           ]
    rank:      number of tokens whose logprob >= lp(chosen)   (1 = most likely)
"""

from __future__ import annotations

import torch


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From full logprobs [n, vocab] and chosen ids [n]: (ids [n, 1+k] int64, logprobs [n, 1+k], ranks [n])."""
    chosen = token_ids.to(torch.int64)[:, None]  # [n, 1]
    chosen_logprobs = logprobs.gather(-1, chosen)  # [n, 1]
    # Ties count against the chosen token (vLLM's convention), so a rank is never optimistic.
    ranks = (logprobs >= chosen_logprobs).sum(dim=-1)  # [n]
    if num_top == 0:
        return chosen, chosen_logprobs, ranks
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # [n, k] each, descending
    ids = torch.cat([chosen, top_ids], dim=-1)  # [n, 1 + k]
    values = torch.cat([chosen_logprobs, top_logprobs], dim=-1)  # [n, 1 + k]
    return ids, values, ranks


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of ``target_ids`` [n] (the next prompt token at each position) under raw
    ``logits`` [n, vocab], plus the top ``k``: (ids [n, 1+k], logprobs [n, 1+k] float32, ranks [n])."""
    logprobs = logits.to(torch.float32).log_softmax(dim=-1)  # [n, vocab]
    return gather_logprobs(logprobs, target_ids, k)
