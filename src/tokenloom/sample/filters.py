"""Truncation filters on temperature-scaled logits: top-k, top-p (nucleus), min-p.

A filtered-out token gets logit -inf. Every filter keeps at least the most
likely token, so a row is never left with nothing to sample.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")
_CPU_TOP_P_CANDIDATES = 1024


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep tokens whose logit is >= the row's k-th largest (ties at the k-th are kept).

    ``top_k`` [num_seqs] holds vocab_size on rows without top-k; one topk(max_top_k)
    serves the whole batch instead of a full sort.
    """
    top_values = logits.topk(max_top_k, dim=-1).values  # [num_seqs, max_top_k], descending
    kth_index = (top_k.clamp(max=max_top_k) - 1)[:, None]  # [num_seqs, 1]
    threshold = top_values.gather(-1, kth_index)  # [num_seqs, 1]
    threshold = threshold.masked_fill_((top_k > max_top_k)[:, None], _NEG_INF)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int, top_p: torch.Tensor,
    num_candidates: int | None = None,
) -> torch.Tensor:
    """Top-k (if given), then top-p over the renormalised top-k survivors.

    Top-p keeps the smallest set of most likely tokens whose probability mass
    reaches ``top_p``: a token survives when the mass strictly before it is < top_p,
    so the most likely token always survives. Both cuts become one logit
    threshold per row (ties at the threshold are kept, as in ``apply_top_k``).

    A full sort of [num_seqs, vocab_size] dominates the sampler on CPU, while a
    nucleus rarely spans more than a few hundred tokens; so on CPU the
    thresholds are first sought among the ``num_candidates`` (default 1024) most
    likely tokens, falling back to the full sort when some row's nucleus is
    longer. The check needs a host sync, which on an accelerator costs more
    than the sort it saves, so there the full sort runs directly.
    """
    vocab_size = logits.shape[-1]
    if num_candidates is None:
        num_candidates = _CPU_TOP_P_CANDIDATES if logits.device.type == "cpu" else vocab_size
    num_candidates = min(vocab_size, max(num_candidates, max_top_k))
    thresholds, complete = _nucleus_thresholds(logits, top_k, top_p, num_candidates)
    if num_candidates < vocab_size and not bool(complete.all()):
        thresholds, _ = _nucleus_thresholds(logits, top_k, top_p, vocab_size)
    return logits.masked_fill_(logits < thresholds, _NEG_INF)


def _nucleus_thresholds(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row keep-threshold [num_seqs, 1] and whether it was found among the candidates [num_seqs]."""
    values = logits.topk(num_candidates, dim=-1).values  # [num_seqs, num_candidates], descending
    log_norm = logits.logsumexp(dim=-1, keepdim=True)  # [num_seqs, 1]; over the whole row
    keep_k = torch.ones_like(values, dtype=torch.bool)  # [num_seqs, num_candidates]
    has_k = torch.zeros_like(log_norm, dtype=torch.bool)  # [num_seqs, 1]
    if top_k is not None:
        # A row with top-k has all its k survivors among the candidates (num_candidates >= max_top_k).
        has_k = (top_k <= num_candidates)[:, None]
        kth = values.gather(-1, (top_k.clamp(max=num_candidates) - 1)[:, None])  # [num_seqs, 1]
        keep_k = ~has_k | (values >= kth)
        k_norm = values.masked_fill(~keep_k, _NEG_INF).logsumexp(dim=-1, keepdim=True)
        log_norm = torch.where(has_k, k_norm, log_norm)
    probs = (values - log_norm).exp_().masked_fill_(~keep_k, 0.0)  # [num_seqs, num_candidates]
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # [num_seqs, num_candidates]
    # top_p == 1 must keep everything even where float cumsum rounds past 1.
    no_top_p = (top_p >= 1.0)[:, None]  # [num_seqs, 1]
    keep = keep_k & ((mass_before < top_p[:, None]) | no_top_p)
    keep[:, 0] = True
    last_kept = keep.sum(dim=-1, keepdim=True) - 1  # [num_seqs, 1]; keep is a prefix of the row
    thresholds = values.gather(-1, last_kept)  # [num_seqs, 1]
    thresholds.masked_fill_(no_top_p & ~has_k, _NEG_INF)  # neither cut applies to these rows
    # Found when the kept prefix ends before the last candidate or cannot extend past it.
    complete = (has_k | no_top_p | ~keep[:, -1:])[:, 0]  # [num_seqs]
    return thresholds, complete


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with prob < min_p * (the row's max prob); min_p = 0 keeps everything.

    Compared in log space (logit < max_logit + log(min_p)): the softmax
    normaliser cancels, so no softmax is needed.
    """
    max_logits = logits.amax(dim=-1, keepdim=True)  # [num_seqs, 1]
    threshold = max_logits + min_p.log()[:, None]  # [num_seqs, 1]; -inf where min_p == 0
    return logits.masked_fill_(logits < threshold, _NEG_INF)
