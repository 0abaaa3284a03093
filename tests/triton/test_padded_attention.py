"""The Triton paged attention on a batch padded to a static size, as a CUDA graph
replays it (runner/cuda_graph.py): padding rows have seq_len 0, and the launch
is sized for the longest context the graph may see, not for the step's.
Runs under Triton's interpreter without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from tests.triton.test_paged_attention import DEVICE, _case
from tokenloom.kernels.triton.attention import SEGMENT, paged_attention

SEQ_LENS = [SEGMENT + 37, 9, 2 * SEGMENT + 1]  # decodes; two of them span several segments


def _decode_batch(num_padding: int):
    """q [n + num_padding, H, D] and the metadata of n decodes followed by padding rows
    (seq_len 0, a block-table row of zeros, one query token each). The cache's unused
    slots hold NaN: a row that read one would show it."""
    n = len(SEQ_LENS)
    q, k_cache, v_cache, _, tables, _ = _case(SEQ_LENS, [1] * n, 4, 2, 16, 16, torch.float32)
    gen = torch.Generator().manual_seed(1)
    q = torch.cat([q, torch.randn(num_padding, 4, 16, generator=gen)])
    tables = torch.cat([tables, torch.zeros(num_padding, tables.shape[1], dtype=torch.int64)])
    seq_lens = torch.tensor(SEQ_LENS + [0] * num_padding, dtype=torch.int64)
    starts = torch.arange(n + num_padding + 1, dtype=torch.int64)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, tables, seq_lens, starts)]


def _attend(batch, max_seq_len: int, split: bool) -> torch.Tensor:
    q, k_cache, v_cache, tables, seq_lens, starts = batch
    return paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, 0.25, max_query_len=1,
                           max_seq_len=max_seq_len, split=split).cpu()


@pytest.mark.parametrize("split", [False, True])
def test_padding_rows_are_finite_zeros_and_change_no_real_row(split):
    n = len(SEQ_LENS)
    alone = _attend(_decode_batch(0), max(SEQ_LENS), split)
    padded = _attend(_decode_batch(5), max(SEQ_LENS), split)
    assert torch.isfinite(padded).all()
    assert torch.equal(padded[n:], torch.zeros(5, 4, 16))
    assert torch.equal(padded[:n], alone)


@pytest.mark.parametrize("split", [False, True])
def test_a_grid_for_a_longer_max_seq_len_gives_the_same_bits(split):
    """A graph's launch covers max_model_len: the segments past a row's keys add nothing."""
    batch = _decode_batch(3)
    exact = _attend(batch, max(SEQ_LENS), split)
    for bound in (max(SEQ_LENS) + 1, 4 * SEGMENT, 8 * SEGMENT + 5):
        assert torch.equal(_attend(batch, bound, split), exact)
    assert torch.equal(_attend(batch, 8 * SEGMENT, not split), exact)  # and split or not: one result
