"""KVCacheManager: which blocks hold which request's tokens.

A request's block table maps token positions to blocks: token t lives in
``block_ids[t // block_size]`` at offset ``t % block_size``. Samples of one
prompt (n > 1) share the prompt's full blocks by ref count::

    sample 0: [b0, b1, b2]      b0, b1: full prompt blocks (ref count 2)
    sample 1: [b0, b1, b5]      b2 / b5: each sample's own partial tail
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenloom.kv_cache.block_pool import BlockPool
from tokenloom.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns a BlockPool and is the only writer of ``Request.block_ids``.

    Invariant between calls, for every live request (see ``check_integrity``)::

        cdiv(num_computed_tokens, block_size) <= len(block_ids) <= cdiv(num_tokens, block_size)

    The lower bound: computed tokens always have a home. The upper bound:
    allocation runs ahead only by a scheduled chunk, and a chunk never goes
    past the known tokens.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make ``req`` hold blocks for ``num_computed_tokens + num_new_tokens`` tokens.
        All or nothing: returns False, changing nothing, if too few blocks are free."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        needed = cdiv(req.num_computed_tokens + num_new_tokens, self.block_size)
        missing = needed - len(req.block_ids)
        if missing <= 0:
            return True
        if missing > self.pool.num_free_blocks:
            return False
        req.block_ids.extend(self.pool.get_new_blocks(missing))
        return True

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks, tail first: an LRU evictor then drops a
        sequence's private tail before the prefix it may share with others."""
        self.pool.free_blocks(reversed(req.block_ids))
        req.block_ids = []

    def share_prefix(self, src: Request, dst: Request, num_tokens: int) -> int:
        """Give ``dst`` (holding no blocks) the full blocks of ``src`` that cover its
        first ``num_tokens`` tokens; those count as computed for ``dst``.
        Returns the number of tokens shared (a multiple of block_size)."""
        if dst.block_ids:
            raise ValueError(f"request {dst.request_id} already holds blocks {dst.block_ids}")
        if num_tokens > src.num_computed_tokens:
            raise ValueError(f"cannot share {num_tokens} tokens of request {src.request_id}: "
                             f"only {src.num_computed_tokens} are computed")
        shared = src.block_ids[:num_tokens // self.block_size]
        self.pool.incref(shared)
        dst.block_ids = list(shared)
        dst.num_computed_tokens = len(shared) * self.block_size
        return dst.num_computed_tokens

    def check_integrity(self, requests: Iterable[Request]) -> None:
        """Pool integrity, plus: ``requests`` are all holders of blocks, so each block's
        ref count equals the number of block tables holding it; no table holds a
        block twice; each table obeys the class invariant."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        for req in requests:
            if len(set(req.block_ids)) != len(req.block_ids):
                raise AssertionError(f"{req.request_id} holds a block twice: {req.block_ids}")
            holders.update(req.block_ids)
            low = cdiv(req.num_computed_tokens, self.block_size)
            high = cdiv(req.num_tokens, self.block_size)
            if not low <= len(req.block_ids) <= high:
                raise AssertionError(
                    f"{req.request_id} holds {len(req.block_ids)} blocks; expected between {low} "
                    f"(computed {req.num_computed_tokens} tokens) and {high} ({req.num_tokens} tokens)")
        for block_id in range(self.pool.num_blocks):
            count = self.pool.ref_count(block_id)
            if count != holders[block_id]:
                raise AssertionError(f"block {block_id} has ref count {count} but "
                                     f"{holders[block_id]} request(s) hold it")
