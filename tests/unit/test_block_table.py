"""The runner's persistent block table: exact rows, exact entries sent, exact gathered tables."""

from __future__ import annotations

import torch

from tokenloom.runner.block_table import BlockTable
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ScheduledRequest, SchedulerOutput


def _sr(request_id: str, blocks: tuple[int, ...], computed: int) -> ScheduledRequest:
    return ScheduledRequest(request_id, (0,), computed, 1, blocks, True, SamplingParams(), (0,), (), 0)


def _step(table: BlockTable, *scheduled: ScheduledRequest, finished=(), preempted=()):
    out = SchedulerOutput(tuple(scheduled), len(scheduled), preempted_ids=tuple(preempted),
                          finished_ids=tuple(finished))
    plan = table.plan(out)
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    gathered = table.apply(t(plan.rows), t(plan.cols), t(plan.block_ids), t(plan.seq_rows), plan.width)
    return plan, gathered.tolist()


def test_only_new_entries_are_sent_and_rows_are_gathered():
    table = BlockTable(4, 8, torch.device("cpu"))
    plan, tables = _step(table, _sr("a", (7, 2), 0), _sr("b", (5,), 0))
    assert (plan.seq_rows, plan.rows, plan.cols, plan.block_ids) == ([0, 1], [0, 0, 1], [0, 1, 0], [7, 2, 5])
    assert tables == [[7, 2], [5, 0]]
    plan, tables = _step(table, _sr("b", (5,), 16), _sr("a", (7, 2), 20))  # nothing new, order swapped
    assert (plan.rows, plan.seq_rows) == ([], [1, 0])
    assert tables == [[5, 0], [7, 2]]
    plan, tables = _step(table, _sr("a", (7, 2, 9), 32))  # a crosses into a third block
    assert (plan.rows, plan.cols, plan.block_ids) == ([0], [2], [9])
    assert tables == [[7, 2, 9]]


def test_finished_rows_are_reused_and_preempted_tables_rebuilt():
    table = BlockTable(2, 8, torch.device("cpu"))
    _step(table, _sr("a", (1, 2), 0), _sr("b", (3,), 0))
    plan, tables = _step(table, _sr("c", (4,), 0), finished=("a",))
    assert (plan.seq_rows, plan.rows, plan.block_ids) == ([0], [0], [4])
    assert tables == [[4]]
    # b preempted and recomputed with new blocks: its whole table is sent again
    plan, tables = _step(table, _sr("b", (6, 8), 0), preempted=("b",))
    assert (plan.rows, plan.cols, plan.block_ids) == ([1, 1], [0, 1], [6, 8])
    assert tables == [[6, 8]]


def test_unannounced_finishes_free_their_rows_when_rows_run_out():
    table = BlockTable(2, 8, torch.device("cpu"))
    _step(table, _sr("a", (1,), 0), _sr("b", (2,), 0))
    plan, tables = _step(table, _sr("c", (3,), 0), _sr("b", (2,), 16))
    assert plan.seq_rows == [0, 1] and tables == [[3], [2]]
    # the id "a" comes back as a new sequence: it gets a fresh row and its blocks
    plan, tables = _step(table, _sr("a", (9, 4), 0), _sr("b", (2,), 17))
    assert tables == [[9, 4], [2, 0]]


def test_a_block_swapped_mid_table_is_resent_from_there():
    """The prefix cache may replace a just-filled block by an identical cached one."""
    table = BlockTable(2, 8, torch.device("cpu"))
    _step(table, _sr("a", (0, 1, 12, 13), 0))
    plan, tables = _step(table, _sr("a", (0, 1, 9, 13, 19), 60))
    assert (plan.rows, plan.cols, plan.block_ids) == ([0, 0, 0], [2, 3, 4], [9, 13, 19])
    assert tables == [[0, 1, 9, 13, 19]]
