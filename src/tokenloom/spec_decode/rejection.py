"""Rejection sampling of a draft model's tokens (Leviathan et al. / Chen et al., 2023).

A draft token d drawn from the draft's distribution q is kept with probability
min(1, p(d) / q(d)), p being the target's; when it is not, the token comes from
the residual norm(max(p - q, 0)). Either way the token is distributed exactly as
p. The randomness is the row's own counter-based streams (``sample/noise.py``):
a uniform for the test and the row's exponential noise for the residual draw,
so a seed reproduces the same tokens whatever the batch.
"""

from __future__ import annotations

import torch


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_ids: torch.Tensor,
                     uniforms: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The verified token of each row [n] int64: ``draft_ids`` where accepted, else a draw
    from the residual. target_probs, draft_probs, noise (Exp(1)): [n, vocab]; draft_ids,
    uniforms: [n]. An accepted draft equals ``draft_ids``; a rejected one never does
    (the residual is 0 at d whenever d can be rejected)."""
    index = draft_ids[:, None]  # [n, 1]
    p_draft = target_probs.gather(-1, index)[:, 0]  # [n]
    q_draft = draft_probs.gather(-1, index)[:, 0]  # [n]
    accepted = uniforms * q_draft < p_draft  # u < p / q, without dividing by a tiny q
    residual = (target_probs - draft_probs).clamp_(min=0.0)  # [n, vocab]
    # p == q up to rounding leaves no residual mass; such a row is accepted anyway, but
    # the draw below must still be well defined.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, target_probs, residual)
    recovered = residual.div_(noise).argmax(dim=-1)  # [n]; argmax(w / E) draws in proportion to w
    return torch.where(accepted, draft_ids, recovered)
