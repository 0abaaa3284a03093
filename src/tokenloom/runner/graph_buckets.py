"""The batch sizes CUDA graphs are captured for, and the one a decode step uses.

A graph replays fixed shapes, so decode steps are padded up to the next of a
few captured sizes (vLLM's cudagraph capture sizes)::

    1 2 4 8 | 16 24 ... 256 (every 8) | 272 288 ... (every 16) | cap
                                            cap = min(max_num_seqs, max_cudagraph_batch_size)

Small batches, where a step is launch-bound and padding is cheapest to avoid,
get the finest steps; the cap is always a size, so every decode step the
scheduler can form (up to max_num_seqs sequences) fits one unless the cap is
below max_num_seqs. Pure Python: no torch.
"""

from __future__ import annotations

from bisect import bisect_left

from tokenloom.config import DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE
_SMALL = (1, 2, 4, 8)
_STEP_TO_256, _STEP_ABOVE_256 = 8, 16


def capture_sizes(max_num_seqs: int, max_cudagraph_batch_size: int = DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE,
                  ) -> tuple[int, ...]:
    """The sizes to capture, ascending, all <= the cap and the cap included."""
    if max_num_seqs < 1 or max_cudagraph_batch_size < 1:
        raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_cudagraph_batch_size "
                         f"({max_cudagraph_batch_size}) must be >= 1")
    cap = min(max_num_seqs, max_cudagraph_batch_size)
    sizes = [*_SMALL, *range(16, 257, _STEP_TO_256), *range(256 + _STEP_ABOVE_256, cap + 1, _STEP_ABOVE_256)]
    return tuple(s for s in sizes if s < cap) + (cap,)


def bucket_for(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of ``sizes`` (ascending) that holds ``num_seqs``; None when none does."""
    i = bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) and num_seqs >= 1 else None
