"""The engine's side of speculative decoding: after each step, give every decoding
sequence its drafts for the next one.

A sequence may take at most ``num_speculative_tokens`` drafts, and never more than
could be kept: a step adds the accepted drafts plus one token, so the drafts stop
short of ``max_tokens`` and of ``max_model_len``. A constrained sequence (structured
output) keeps only the drafts its grammar allows. When more than
``disable_by_batch_size`` sequences run, nobody speculates: the step is then
compute-bound, and verifying 1 + k rows costs about 1 + k decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tokenloom.config import SpeculativeConfig
from tokenloom.request import Request
from tokenloom.spec_decode.ngram import NgramProposer


class DraftModel(Protocol):
    """A proposer that runs a model (``spec_decode.draft_model.DraftModelProposer``)."""

    def propose(self, requests: Sequence[Request], num_drafts: Sequence[int]) -> list[list[int]]: ...
    def draft_probs(self) -> dict[str, torch.Tensor]: ...
    def retain(self, request_ids: set[str]) -> None: ...


class Drafter:
    def __init__(self, config: SpeculativeConfig, max_model_len: int,
                 draft_model: DraftModel | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.ngram = (NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
                      if config.method == "ngram" else None)
        self.draft_model = draft_model

    def propose(self, running: Sequence[Request]) -> None:
        """Set ``spec_token_ids`` of every running sequence (empty where it does not speculate)."""
        if self.draft_model is not None:
            self.draft_model.retain({req.request_id for req in running})  # finished ones let go
        limit = self.config.disable_by_batch_size
        active = [] if limit is not None and len(running) > limit else [r for r in running if r.is_decoding]
        for req in running:
            req.spec_token_ids = []
        caps = [self.max_drafts(req) for req in active]
        requests = [req for req, cap in zip(active, caps) if cap > 0]
        caps = [cap for cap in caps if cap > 0]
        if not requests:
            return
        if self.ngram is not None:
            drafts = [self.ngram.propose(req.all_token_ids, cap) for req, cap in zip(requests, caps)]
        else:
            drafts = self.draft_model.propose(requests, caps)
        for req, tokens in zip(requests, drafts):
            req.spec_token_ids = _allowed_prefix(req, tokens)

    def max_drafts(self, req: Request) -> int:
        """Drafts that could all be kept: the step adds them plus one token."""
        cap = min(self.config.num_speculative_tokens, self.max_model_len - req.num_tokens - 1)
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:
            cap = min(cap, max_tokens - req.num_output_tokens - 1)
        return max(cap, 0)

    def draft_probs(self) -> dict[str, torch.Tensor] | None:
        """A draft model's distributions for the drafts it proposed last (None for n-gram)."""
        return None if self.draft_model is None else self.draft_model.draft_probs()


def _allowed_prefix(req: Request, tokens: list[int]) -> list[int]:
    """The drafts a constrained sequence's grammar accepts, in order (all of them when unconstrained)."""
    if req.grammar is None or not tokens:
        return tokens
    return tokens[:req.grammar.num_valid(tokens)]
