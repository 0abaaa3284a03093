"""BlockPool: the KV cache's physical blocks, their ref counts and the free queue.

A block is free exactly when its ref count is 0. Free blocks wait in a queue in
LRU order: a freed block joins the tail, allocation takes from the head::

    free queue (head -> tail):  [b4, b0, b7, b2]
    get_new_blocks(2)  -> [b4, b0]          queue: [b7, b2]
    free_blocks([b9])  -> b9 at ref 0       queue: [b7, b2, b9]

The prefix cache keeps the content of free blocks alive until they are handed
out again, so it evicts from the head and revives from the middle (``incref``
of a free block); an ordered dict gives both in O(1).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable


class BlockPool:
    """Owns block ids ``0 .. num_blocks - 1``; every one of them is usable.

    Contract: a block is in the free queue iff its ref count is 0; ids come out
    of ``get_new_blocks`` in free-queue order (a fresh pool hands out 0, 1, 2, ...),
    so the same calls always give the same ids.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # Keys only (values unused): insertion order is the LRU order.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    def free_block_ids(self) -> list[int]:
        """The free queue, head (next to be handed out) first."""
        return list(self._free_queue)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def get_new_blocks(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head of the free queue, each at ref count 1."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks > len(self._free_queue):
            raise ValueError(f"asked for {num_blocks} blocks but only "
                             f"{len(self._free_queue)} of {self.num_blocks} are free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one holder to each block. A free block is taken out of the free queue
        (the prefix cache revives a block whose content is still valid this way)."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self._ref_counts[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one holder from each block; blocks reaching 0 join the free queue's
        tail in the given order. Raises ValueError (changing nothing) if a block
        would go below 0."""
        block_ids = list(block_ids)
        for block_id, count in Counter(block_ids).items():
            self._check_id(block_id)
            if count > self._ref_counts[block_id]:
                raise ValueError(f"block {block_id} freed {count} time(s) but its ref count "
                                 f"is {self._ref_counts[block_id]}")
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_queue[block_id] = None

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant.

        The queue cannot hold a block twice (dict keys), so "free + used ==
        num_blocks" follows from each block's ref count agreeing with its queue
        membership, which is what is checked here, with ref counts >= 0.
        """
        for block_id in self._free_queue:
            if not 0 <= block_id < self.num_blocks:
                raise AssertionError(f"free queue holds out-of-range block id {block_id}")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise AssertionError(f"block {block_id} has negative ref count {count}")
            in_queue = block_id in self._free_queue
            if count > 0 and in_queue:
                raise AssertionError(f"block {block_id} is in the free queue but has ref count {count}")
            if count == 0 and not in_queue:
                raise AssertionError(f"block {block_id} has ref count 0 but is not in the free queue")

    def _check_id(self, block_id: int) -> None:
        # Python would silently accept a negative index into the ref count list.
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is out of range [0, {self.num_blocks})")
