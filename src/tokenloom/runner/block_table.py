"""The block tables of running sequences, kept on the device between steps.

A running sequence's block list mostly grows at its end, so re-sending every
table every step repeats what the device already holds. Each running sequence
owns a row of one persistent table; a step sends only the entries that changed
since the row was last sent (a sequence's first step, a block crossed, a table
rebuilt after preemption, a full block swapped for its prefix-cache twin) and
gathers the step's rows on the device::

    table [max_rows, max_blocks_per_seq]     row 3: [b7, b2, b9, ...]   (request "a")
    step rows [3, 0, 5]  -> block_tables [num_seqs, width] = table[rows, :width]

Entries past a sequence's own blocks are stale or 0; attention never reads
them (it stops at the sequence's length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.sched.output import SchedulerOutput


@dataclass(frozen=True, slots=True)
class TableUpdate:
    """Host side of one step: the rows of the step's sequences and the entries to write."""

    seq_rows: list[int]  # [num_seqs]
    rows: list[int]  # [num_updates]
    cols: list[int]
    block_ids: list[int]
    width: int  # the longest block list this step


class BlockTable:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.table = torch.zeros((max_rows, max_blocks_per_seq), dtype=torch.int64, device=device)
        self._row_of: dict[str, int] = {}
        self._free = list(range(max_rows - 1, -1, -1))
        self._sent: list[tuple[int, ...]] = [()] * max_rows  # what each row holds on the device

    def plan(self, out: SchedulerOutput) -> TableUpdate:
        """Assign rows and list the new entries (host only; ``apply`` writes them)."""
        for request_id in (*out.finished_ids, *out.preempted_ids):
            self._release(request_id)
        seq_rows, rows, cols, block_ids = [], [], [], []
        step_ids = {sr.request_id for sr in out.scheduled}
        for sr in out.scheduled:
            row = self._row_of.get(sr.request_id)
            if row is None:
                row = self._assign(sr.request_id, step_ids)
            blocks = sr.block_ids
            if len(blocks) > self.table.shape[1]:
                raise ValueError(f"{sr.request_id}: {len(blocks)} blocks exceed the table's "
                                 f"{self.table.shape[1]} per sequence")
            known = _common_prefix(self._sent[row], blocks)
            rows.extend([row] * (len(blocks) - known))
            cols.extend(range(known, len(blocks)))
            block_ids.extend(blocks[known:])
            self._sent[row] = blocks
            seq_rows.append(row)
        width = max(len(sr.block_ids) for sr in out.scheduled)
        return TableUpdate(seq_rows, rows, cols, block_ids, width)

    def apply(self, rows: torch.Tensor, cols: torch.Tensor, block_ids: torch.Tensor,
              seq_rows: torch.Tensor, width: int) -> torch.Tensor:
        """Write the new entries (device tensors) and gather the step's tables [num_seqs, width]."""
        if rows.numel():
            self.table.index_put_((rows, cols), block_ids)
        return self.table[:, :width].index_select(0, seq_rows)

    def _assign(self, request_id: str, step_ids: set[str]) -> int:
        if not self._free:  # rows of sequences that finished unannounced (no step came between)
            for stale in [r for r in self._row_of if r not in step_ids]:
                self._release(stale)
        if not self._free:
            raise RuntimeError(f"more than {self.table.shape[0]} sequences in one step")
        row = self._free.pop()
        self._row_of[request_id] = row
        self._sent[row] = ()
        return row

    def _release(self, request_id: str) -> None:
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._free.append(row)


def _common_prefix(sent: tuple[int, ...], blocks: tuple[int, ...]) -> int:
    """How many leading entries ``blocks`` shares with ``sent`` (one C-level compare
    in the common case: nothing changed but blocks appended)."""
    if blocks[:len(sent)] == sent:
        return len(sent)
    return next((i for i, (a, b) in enumerate(zip(sent, blocks)) if a != b), min(len(sent), len(blocks)))
