"""Which drafts a verify step accepts."""

from __future__ import annotations

from collections.abc import Sequence


def num_accepted(sampled: Sequence[int], drafts: Sequence[int]) -> int:
    """Drafts confirmed in order: ``sampled[i]`` is the target's token after the first i
    drafts, so draft i stands while it equals ``sampled[i]``. The sequence then gains
    ``sampled[:num_accepted + 1]``: the accepted drafts and the target's next token."""
    count = 0
    for token, draft in zip(sampled, drafts):
        if token != draft:
            break
        count += 1
    return count
