"""The engine's side of speculative decoding: after each step, give every decoding
sequence its drafts for the next one.

A sequence may take at most ``num_speculative_tokens`` drafts, fewer when its drafts
have been failing (``worthwhile_drafts``), and never more than could be kept: a step
adds the accepted drafts plus one token, so the drafts stop short of ``max_tokens``
and of ``max_model_len``. A constrained sequence (structured output) keeps only the
drafts its grammar allows. When more than ``disable_by_batch_size`` sequences run,
nobody speculates: the step is then compute-bound, and verifying 1 + k rows costs
about 1 + k decodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from tokenloom.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from tokenloom.request import Request
from tokenloom.spec_decode.ngram import NgramProposer

# A draft is worth a verify row when it adds at least this many tokens in expectation.
MIN_DRAFT_GAIN = 0.3


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
        """Drafts worth verifying that could all be kept (the step adds them plus one token)."""
        cap = min(self.config.num_speculative_tokens, worthwhile_drafts(req.num_draft_tokens, req.num_accepted_tokens),
                  self.max_model_len - req.num_tokens - 1)
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:
            cap = min(cap, max_tokens - req.num_output_tokens - 1)
        return max(cap, 0)

    def draft_probs(self) -> dict[str, torch.Tensor] | None:
        """A draft model's distributions for the drafts it proposed last (None for n-gram)."""
        return None if self.draft_model is None else self.draft_model.draft_probs()


def worthwhile_drafts(num_drafted: int, num_accepted: int) -> int:
    """How many drafts a sequence should verify, from how its drafts fared so far.

    Draft j is used only if drafts 1 .. j - 1 were all accepted: with a per-draft
    acceptance rate a it adds a**j tokens in expectation, and costs a row of the verify
    step whether it is accepted or not. Drafts stop where a**j drops below
    ``MIN_DRAFT_GAIN`` (at least one is kept: the rate must go on being measured). The
    rate starts at 3/4 (a prior worth four drafts) and follows the sequence's own record.
    """
    rate = (num_accepted + 3) / (num_drafted + 4)  # < 1
    return max(1, min(MAX_SPECULATIVE_TOKENS, int(math.log(MIN_DRAFT_GAIN) / math.log(rate))))


def _allowed_prefix(req: Request, tokens: list[int]) -> list[int]:
    """The drafts a constrained sequence's grammar accepts, in order (all of them when unconstrained)."""
    if req.grammar is None or not tokens:
        return tokens
    return tokens[:req.grammar.num_valid(tokens)]
