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
from numpy.lib.stride_tricks import sliding_window_view


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
        if num_drafts < 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows starting before the suffix itself: [0, length - n).
            windows = sliding_window_view(tokens[:length - 1], n)  # [length - n, n]
            hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start:start + num_drafts].tolist()
        return []
