"""PrefixCache: automatic prefix caching as a radix tree over full KV blocks.

Every node is one full, computed block; the edge into it is that block's
``block_size`` tokens, so the path from the root spells every token up to the
block's end. KV depends on exactly those tokens (and their positions, which the
depth gives), so two sequences whose paths agree can share the block::

    root
     +-- (t0..t3) b3                    "You are a helpful assistant..."
     |     +-- (t4..t7) b7
     |           +-- (q0..q3) b9        request A's question
     |           +-- (r0..r3) b2        request B's question
     +-- (u0..u3) b4                    an unrelated prompt

Children are a dict keyed by the token tuple, so a lookup compares the tokens
themselves: a hash collision can never make two different prefixes share KV.

Blocks are evicted leaves first, least recently released first (the pool's
evictable queue is in release order). A node's holders always hold its parent
too (block tables are prefixes), so a cached-free node has only cached-free
descendants and everything evictable can be evicted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenloom.kv_cache.block_pool import BlockPool


@dataclass(eq=False, slots=True)
class BlockNode:
    """One cached full block. ``parent`` is None at the top level; ``depth`` counts
    the blocks from the root down to and including this one."""

    block_id: int
    tokens: tuple[int, ...]
    parent: BlockNode | None
    depth: int
    children: dict[tuple[int, ...], BlockNode] = field(default_factory=dict)


class PrefixCache:
    """The index of cached blocks. It marks blocks cached in the pool when it
    inserts them and evicts them through the pool; it never changes ref counts.

    Contract: a block is in the tree iff the pool marks it cached; a node is
    evicted only when it is cached-free and a leaf.
    """

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._top: dict[tuple[int, ...], BlockNode] = {}
        self._nodes: dict[int, BlockNode] = {}  # block id -> its node

    @property
    def num_cached_blocks(self) -> int:
        return len(self._nodes)

    def node_of(self, block_id: int) -> BlockNode | None:
        return self._nodes.get(block_id)

    def match(self, block_tokens: Iterable[tuple[int, ...]]) -> list[BlockNode]:
        """The longest cached path spelling ``block_tokens`` (one tuple per block), root first."""
        path: list[BlockNode] = []
        children = self._top
        for tokens in block_tokens:
            node = children.get(tokens)
            if node is None:
                break
            path.append(node)
            children = node.children
        return path

    def insert(self, parent: BlockNode | None, tokens: tuple[int, ...], block_id: int) -> BlockNode:
        """Cache ``block_id`` (in use, computed) as the child of ``parent`` holding ``tokens``.
        If that child already exists it is returned unchanged, with its own block id:
        the caller then holds a duplicate of cached content."""
        if len(tokens) != self.block_size:
            raise ValueError(f"a cached block holds {self.block_size} tokens, got {len(tokens)}")
        children = self._children_of(parent)
        node = children.get(tokens)
        if node is not None:
            return node
        self.pool.mark_cached(block_id)
        node = BlockNode(block_id, tokens, parent, parent.depth + 1 if parent else 1)
        children[tokens] = node
        self._nodes[block_id] = node
        return node

    def evict(self, num_blocks: int) -> list[int]:
        """Evict ``num_blocks`` cached-free leaves, least recently released first (a
        parent becomes a leaf once its children are gone). Returns their ids, which
        are now at the tail of the pool's free queue."""
        if num_blocks > self.pool.num_evictable_blocks:
            raise ValueError(f"cannot evict {num_blocks} blocks: only "
                             f"{self.pool.num_evictable_blocks} are cached-free")
        victims: dict[int, None] = {}  # ordered: every child before its parent
        while len(victims) < num_blocks:
            if not self._pick_leaves(num_blocks - len(victims), victims):
                raise AssertionError("no evictable leaf left: a cached-free block has a child in use")
        for block_id in victims:
            node = self._nodes.pop(block_id)
            del self._children_of(node.parent)[node.tokens]
            self.pool.evict(block_id)
        return list(victims)

    def _pick_leaves(self, wanted: int, victims: dict[int, None]) -> int:
        """One pass over the evictable queue, adding up to ``wanted`` nodes whose children
        are all victims already. Release order puts children first, so one pass
        normally suffices."""
        picked = 0
        for block_id in self.pool.iter_evictable():
            if picked == wanted:
                break
            if block_id in victims:
                continue
            if all(child.block_id in victims for child in self._nodes[block_id].children.values()):
                victims[block_id] = None
                picked += 1
        return picked

    def _children_of(self, parent: BlockNode | None) -> dict[tuple[int, ...], BlockNode]:
        return self._top if parent is None else parent.children

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant: the tree's links and
        depths agree, every node is one full block, tree and pool agree on which blocks
        are cached, and no in-use block hangs below a cached-free one."""
        seen = 0
        stack: list[tuple[BlockNode | None, dict[tuple[int, ...], BlockNode]]] = [(None, self._top)]
        while stack:
            parent, children = stack.pop()
            for tokens, node in children.items():
                self._check_node(parent, tokens, node)
                seen += 1
                stack.append((node, node.children))
        if seen != len(self._nodes):
            raise AssertionError(f"the block index has {len(self._nodes)} entries but the tree "
                                 f"{seen} nodes")
        for block_id in range(self.pool.num_blocks):
            if self.pool.is_cached(block_id) != (block_id in self._nodes):
                raise AssertionError(f"block {block_id}: pool says cached={self.pool.is_cached(block_id)}, "
                                     f"the tree says {block_id in self._nodes}")

    def _check_node(self, parent: BlockNode | None, tokens: tuple[int, ...], node: BlockNode) -> None:
        if node.tokens != tokens or node.parent is not parent:
            raise AssertionError(f"block {node.block_id}: node key or parent link is wrong")
        if len(tokens) != self.block_size:
            raise AssertionError(f"block {node.block_id} is cached with {len(tokens)} tokens")
        if node.depth != (parent.depth + 1 if parent else 1):
            raise AssertionError(f"block {node.block_id} has depth {node.depth} under its parent")
        if self._nodes.get(node.block_id) is not node:
            raise AssertionError(f"block {node.block_id} is in the tree twice or not indexed")
        if parent is not None and self.pool.ref_count(node.block_id) > 0 \
                and self.pool.ref_count(parent.block_id) == 0:
            raise AssertionError(f"block {node.block_id} is in use but its parent "
                                 f"{parent.block_id} is cached-free")
