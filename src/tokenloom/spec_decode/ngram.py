"""N-gram (prompt lookup) proposer: the sequence's own text predicts its continuation.

When the last n tokens already occurred earlier in the sequence (prompt or
output), the tokens that followed that occurrence are proposed as drafts:
copying, quoting, editing and answering from a given document repeat long runs
of their input, and there the drafts are right. n runs from
``prompt_lookup_max`` down to ``prompt_lookup_min``; the most recent
occurrence wins. A sequence with no match gets no drafts, so its step costs
what a plain decode costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{prompt_lookup_min} and {prompt_lookup_max}")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: Sequence[int], num_drafts: int) -> list[int]:
        """Up to ``num_drafts`` tokens to follow ``token_ids`` (fewer near the end of a match,
        none without one)."""
        if num_drafts < 1 or len(token_ids) < 2:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        # Earlier positions holding the last token: where a match can end. One pass over
        # the sequence; the rest works on these few candidates.
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if ends.size == 0:
            return []
        matched = np.ones(ends.size, dtype=np.int64)  # match length at each end, up to max_n
        for j in range(1, min(self.max_n, length - 1)):
            before = ends - j
            same = (before >= 0) & (tokens[np.maximum(before, 0)] == tokens[length - 1 - j])
            matched += (matched == j) & same
        best = int(matched.max())
        if best < self.min_n:
            return []
        start = int(ends[np.flatnonzero(matched >= best)[-1]]) + 1  # the most recent longest match
        return tokens[start:start + num_drafts].tolist()
