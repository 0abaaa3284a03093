"""The tensor-parallel group's exchanges over gloo: ranks as threads of this process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from tests.helpers.tensor_parallel import free_init_method
from tokenloom.parallel.group import SINGLE, ProcessTPGroup


def on_ranks(size: int, work) -> list:
    """``work(group)`` on each of ``size`` ranks at once; their results in rank order."""
    init = free_init_method()

    def rank(r: int):
        group = ProcessTPGroup(init, r, size, torch.device("cpu"))
        try:
            return work(group)
        finally:
            group.close()

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(rank, range(size)))


def values(rank: int) -> torch.Tensor:
    return torch.randn(5, 7, generator=torch.Generator().manual_seed(rank)) * 10 ** rank


def test_all_reduce_is_the_rank_order_sum_in_the_same_bits_everywhere():
    sums = on_ranks(3, lambda g: g.all_reduce(values(g.rank)))
    expected = values(0) + values(1) + values(2)
    assert all(torch.equal(s, expected) for s in sums)


def test_logits_of_uneven_vocabulary_shares_gather_on_rank_0():
    widths = (3, 4, 2)
    columns = torch.arange(5 * 9, dtype=torch.float32).view(5, 9)
    starts = (0, 3, 7)
    gathered = on_ranks(3, lambda g: g.gather_logits(columns[:, starts[g.rank]:starts[g.rank] + widths[g.rank]],
                                                     widths))
    assert torch.equal(gathered[0], columns)
    assert torch.equal(gathered[2], columns[:, 7:])  # the others keep their own columns


def test_objects_broadcast_from_and_gather_at_rank_0():
    def work(g):
        message = g.broadcast_object({"step": 3, "ids": [1, 2]} if g.rank == 0 else None)
        return message, g.gather_object(("rank", g.rank))

    results = on_ranks(3, work)
    assert [m for m, _ in results] == [{"step": 3, "ids": [1, 2]}] * 3
    assert results[0][1] == [("rank", 0), ("rank", 1), ("rank", 2)]
    assert results[1][1] is None


def test_one_rank_alone_exchanges_nothing():
    x = torch.ones(2)
    assert SINGLE.all_reduce(x) is x and SINGLE.gather_logits(x, (2,)) is x
    assert SINGLE.broadcast_object(5) == 5 and SINGLE.gather_object(5) == [5]
