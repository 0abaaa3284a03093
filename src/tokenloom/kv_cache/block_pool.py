"""BlockPool: the KV cache's physical blocks, their ref counts and the free queues.

Every block is in exactly one of three states::

    in use       ref count > 0            held by one or more block tables
    cached-free  ref count 0, cached      content indexed by the prefix cache; kept
                                          until memory is needed (evictable queue, LRU)
    free         ref count 0, not cached  nothing worth keeping (free queue)

Both queues are in release order: a block reaching ref count 0 joins the tail,
so the head is the least recently used::

    free queue (head -> tail):  [b4, b0, b7, b2]
    get_new_blocks(2)  -> [b4, b0]          free queue: [b7, b2]
    free_blocks([b9])  -> b9 at ref 0       free queue: [b7, b2, b9]   (b9 not cached)
    free_blocks([b5])  -> b5 at ref 0       evictable:  [.., b5]       (b5 cached)

``get_new_blocks`` takes only from the free queue; the prefix cache decides which
cached-free blocks to ``evict`` (back to the free queue) when that runs short, and
revives a cached-free block with ``incref``. Ordered dicts give O(1) for all three.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator


class BlockPool:
    """Owns block ids ``0 .. num_blocks - 1``; every one of them is usable.

    Contract: a block is in the free queue iff its ref count is 0 and it is not
    cached; in the evictable queue iff its ref count is 0 and it is cached. Ids
    come out of ``get_new_blocks`` in free-queue order (a fresh pool hands out
    0, 1, 2, ...), so the same calls always give the same ids. Only the prefix
    cache marks blocks cached (``mark_cached``) and uncached (``evict``).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # Keys only (values unused): insertion order is the LRU order.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue (cached-free ones not included)."""
        return len(self._free_queue)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref count > 0."""
        return self.num_blocks - len(self._free_queue) - len(self._evictable)

    def free_block_ids(self) -> list[int]:
        """The free queue, head (next to be handed out) first."""
        return list(self._free_queue)

    def evictable_block_ids(self) -> list[int]:
        """The cached-free blocks, least recently released first."""
        return list(self._evictable)

    def iter_evictable(self) -> Iterator[int]:
        """Like ``evictable_block_ids`` without the copy; do not change the pool while iterating."""
        return iter(self._evictable)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._cached

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
        """Add one holder to each block. A block at ref count 0 leaves its queue
        (the prefix cache revives a cached-free block this way)."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                self._queue_of(block_id).pop(block_id)
            self._ref_counts[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one holder from each block; blocks reaching 0 join the tail of their
        queue in the given order. Raises ValueError (changing nothing) if a block
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
                self._queue_of(block_id)[block_id] = None

    def mark_cached(self, block_id: int) -> None:
        """The prefix cache now indexes this block's content (it must be in use)."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"block {block_id} is not in use; only computed blocks held "
                             f"by a request can be cached")
        if block_id in self._cached:
            raise ValueError(f"block {block_id} is already cached")
        self._cached.add(block_id)

    def evict(self, block_id: int) -> None:
        """Forget a cached-free block's content: it moves to the free queue's tail."""
        self._check_id(block_id)
        if block_id not in self._evictable:
            raise ValueError(f"block {block_id} is not cached-free (ref count "
                             f"{self._ref_counts[block_id]}, cached {block_id in self._cached})")
        del self._evictable[block_id]
        self._cached.remove(block_id)
        self._free_queue[block_id] = None

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant: each block is
        exactly one of free, cached-free or in use, as its ref count and cached
        mark say. (A queue cannot hold a block twice: dict keys.)"""
        for name, queue in (("free queue", self._free_queue), ("evictable queue", self._evictable),
                            ("cached set", self._cached)):
            for block_id in queue:
                if not 0 <= block_id < self.num_blocks:
                    raise AssertionError(f"{name} holds out-of-range block id {block_id}")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise AssertionError(f"block {block_id} has negative ref count {count}")
            for queue, name in ((self._free_queue, "free"), (self._evictable, "evictable")):
                if count > 0 and block_id in queue:
                    raise AssertionError(f"block {block_id} is in the {name} queue but has ref count {count}")
            home, other = ((self._evictable, self._free_queue) if block_id in self._cached
                           else (self._free_queue, self._evictable))
            if block_id in other:
                raise AssertionError(f"block {block_id} is in the wrong queue "
                                     f"(cached: {block_id in self._cached})")
            if count == 0 and block_id not in home:
                name = "evictable" if home is self._evictable else "free"
                raise AssertionError(f"block {block_id} has ref count 0 but is not in the {name} queue")

    def _queue_of(self, block_id: int) -> OrderedDict[int, None]:
        """Where ``block_id`` waits (or will wait) while its ref count is 0."""
        return self._evictable if block_id in self._cached else self._free_queue

    def _check_id(self, block_id: int) -> None:
        # Python would silently accept a negative index into the ref count list.
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is out of range [0, {self.num_blocks})")
