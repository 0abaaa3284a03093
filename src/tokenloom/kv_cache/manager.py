"""KVCacheManager: which blocks hold which request's tokens.

A request's block table maps token positions to blocks: token t lives in
``block_ids[t // block_size]`` at offset ``t % block_size``. Requests with a
common prefix share its full blocks by ref count, whether they found them in
the prefix cache or took them from a sibling sample (n > 1)::

    request A: [b0, b1, b2]      b0, b1: full blocks of the shared prefix (ref count 2)
    request B: [b0, b1, b5]      b2 / b5: each request's own tail

With prefix caching on, every full computed block is indexed in the prefix
cache (``cache_full_blocks``) and outlives its requests as cached-free until
an allocation needs the memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenloom.kv_cache.block_pool import BlockPool
from tokenloom.kv_cache.prefix_cache import BlockNode, PrefixCache
from tokenloom.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns a BlockPool (and the PrefixCache when enabled) and is the only writer of
    ``Request.block_ids``.

    Invariant between calls, for every live request (see ``check_integrity``)::

        cdiv(num_computed_tokens, block_size) <= len(block_ids)
                                               <= cdiv(num_tokens + len(spec_token_ids), block_size)

    The lower bound: computed tokens always have a home. The upper bound:
    allocation runs ahead only by a scheduled chunk, and a chunk never goes
    past the known tokens and the draft tokens (speculative decoding) that
    ride after them; once a step is applied, rejected drafts' blocks are
    given back (``trim``). With prefix caching, also: the first
    ``num_computed_tokens // block_size`` blocks of a table are the cached path
    of its tokens once ``cache_full_blocks`` has seen them.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_cache = PrefixCache(self.pool, block_size) if enable_prefix_caching else None
        # request id -> node of its deepest block in the tree: where cache_full_blocks resumes.
        self._cache_cursors: dict[str, BlockNode] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free plus cached-free (evicted on demand)."""
        return self.pool.num_free_blocks + self.pool.num_evictable_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (held by a request), 0..1."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make ``req`` hold blocks for ``num_computed_tokens + num_new_tokens`` tokens,
        evicting cached-free blocks only when the free queue runs short.
        All or nothing: returns False, changing nothing, if too few blocks are available."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        needed = cdiv(req.num_computed_tokens + num_new_tokens, self.block_size)
        missing = needed - len(req.block_ids)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        shortfall = missing - self.pool.num_free_blocks
        if shortfall > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(shortfall)
        req.block_ids.extend(self.pool.get_new_blocks(missing))
        return True

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks, tail first: the evictor then drops a sequence's
        private tail before the prefix it may share with others."""
        self.pool.free_blocks(reversed(req.block_ids))
        req.block_ids = []
        self._cache_cursors.pop(req.request_id, None)

    def trim(self, req: Request) -> None:
        """Free the blocks past what ``req``'s known tokens need: the slots of rejected
        draft tokens (speculative decoding), never computed-and-kept KV."""
        keep = cdiv(req.num_tokens, self.block_size)
        if len(req.block_ids) > keep:
            self.pool.free_blocks(reversed(req.block_ids[keep:]))
            del req.block_ids[keep:]

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

    # ---- prefix caching ------------------------------------------------------

    def allocate_cached_prefix(self, req: Request, max_tokens: int) -> int:
        """Give ``req`` (holding no blocks) the longest cached prefix of its tokens that
        fits in ``max_tokens``, in whole blocks, shared by ref count; those tokens count
        as computed. Returns the number of tokens reused (0 with prefix caching off)."""
        if req.block_ids:
            raise ValueError(f"request {req.request_id} already holds blocks {req.block_ids}")
        if max_tokens > req.num_tokens:
            raise ValueError(f"cannot reuse {max_tokens} tokens of request {req.request_id}: "
                             f"it has only {req.num_tokens}")
        if self.prefix_cache is None:
            return 0
        path = self.prefix_cache.match(self._block_tokens(req, i)
                                       for i in range(max_tokens // self.block_size))
        req.block_ids = [node.block_id for node in path]
        self.pool.incref(req.block_ids)
        req.num_computed_tokens = len(path) * self.block_size
        if path:
            self._cache_cursors[req.request_id] = path[-1]
        return req.num_computed_tokens

    def cache_full_blocks(self, req: Request) -> None:
        """Index ``req``'s full computed blocks in the prefix cache (nothing when off).

        A block whose content another request cached first (both computed it in the
        same step) is swapped for the cached one and its own copy freed: each content
        is cached once, and a table's full computed blocks stay a path of the tree.
        """
        if self.prefix_cache is None:
            return
        node = self._cache_cursors.get(req.request_id)
        for i in range(node.depth if node else 0, req.num_computed_tokens // self.block_size):
            own = req.block_ids[i]
            node = self.prefix_cache.insert(node, self._block_tokens(req, i), own)
            if node.block_id != own:
                self.pool.incref([node.block_id])
                self.pool.free_blocks([own])
                req.block_ids[i] = node.block_id
        if node is not None:
            self._cache_cursors[req.request_id] = node

    def _block_tokens(self, req: Request, index: int) -> tuple[int, ...]:
        """The tokens of block ``index`` of ``req`` (prompt, then output)."""
        start, end = index * self.block_size, (index + 1) * self.block_size
        prompt, output = req.prompt_token_ids, req.output_token_ids
        num_prompt = len(prompt)
        if end <= num_prompt:
            return tuple(prompt[start:end])
        if start >= num_prompt:
            return tuple(output[start - num_prompt:end - num_prompt])
        return tuple(prompt[start:]) + tuple(output[:end - num_prompt])

    # ---- invariants ------------------------------------------------------------

    def check_integrity(self, requests: Iterable[Request]) -> None:
        """Pool (and prefix cache) integrity, plus: ``requests`` are all holders of
        blocks, so each block's ref count equals the number of block tables holding
        it; no table holds a block twice; each table obeys the class invariant."""
        self.pool.check_integrity()
        requests = list(requests)
        holders: Counter[int] = Counter()
        for req in requests:
            if len(set(req.block_ids)) != len(req.block_ids):
                raise AssertionError(f"{req.request_id} holds a block twice: {req.block_ids}")
            holders.update(req.block_ids)
            low = cdiv(req.num_computed_tokens, self.block_size)
            high = cdiv(req.num_tokens + len(req.spec_token_ids), self.block_size)
            if not low <= len(req.block_ids) <= high:
                raise AssertionError(
                    f"{req.request_id} holds {len(req.block_ids)} blocks; expected between {low} "
                    f"(computed {req.num_computed_tokens} tokens) and {high} ({req.num_tokens} tokens "
                    f"and {len(req.spec_token_ids)} drafts)")
        for block_id in range(self.pool.num_blocks):
            count = self.pool.ref_count(block_id)
            if count != holders[block_id]:
                raise AssertionError(f"block {block_id} has ref count {count} but "
                                     f"{holders[block_id]} request(s) hold it")
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()
            self._check_cached_tables(self.prefix_cache, requests)

    def _check_cached_tables(self, cache: PrefixCache, requests: list[Request]) -> None:
        """A cached block sits in a table where its node says: at its depth, after its
        parent's block, over the same tokens. Cursors point at held blocks of live requests."""
        live = {req.request_id for req in requests}
        if not self._cache_cursors.keys() <= live:
            raise AssertionError(f"cache cursors left for released requests "
                                 f"{sorted(self._cache_cursors.keys() - live)}")
        for req in requests:
            for i, block_id in enumerate(req.block_ids):
                node = cache.node_of(block_id)
                if node is None:
                    continue
                parent_ok = (node.parent is None if i == 0
                             else node.parent is not None and node.parent.block_id == req.block_ids[i - 1])
                if node.depth != i + 1 or not parent_ok or node.tokens != self._block_tokens(req, i):
                    raise AssertionError(f"{req.request_id} holds cached block {block_id} at index {i}, "
                                         f"off its path in the prefix cache")
            cursor = self._cache_cursors.get(req.request_id)
            if cursor is not None and req.block_ids[cursor.depth - 1:cursor.depth] != [cursor.block_id]:
                raise AssertionError(f"{req.request_id}: cache cursor at block {cursor.block_id} "
                                     f"is not its block {cursor.depth - 1}")
