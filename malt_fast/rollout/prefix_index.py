"""Prefix index: cached blocks keyed by (weights, tokens), a radix tree per weights key.

A node is one block and the tokens (at most a block) it caches after its parent's. The index
holds one reference to each of its blocks through the pool (`BlockPool.cache`), so they outlive
the sequences that wrote them; a new sequence starts from the longest cached prefix of its
context, to the token (a partly matched block is shared, and copied on its first write). Blocks
that only the index holds are evicted least recently used first, leaves before parents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from malt_fast.rollout.block_pool import BlockPool


@dataclass(eq=False)
class Node:
    """One block of the index: its `tokens` (at most a block) follow its parent's."""
    block: int
    tokens: tuple
    parent: "Node | None" = None
    depth: int = 0
    last_use: int = 0
    children: dict = field(default_factory=dict)  # tokens -> Node


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixIndex:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool, self.block_size = pool, block_size
        self.roots: dict = {}  # weights key -> root Node (no block)
        self.nodes: dict[int, Node] = {}  # block -> its node
        self.evicted = 0
        self._clock = 0

    def match(self, tokens, weights=None, limit: int | None = None) -> tuple[list[Node], int]:
        """The longest cached prefix of `tokens[:limit]` computed with `weights`: its nodes,
        root first, and its length in tokens (the last node may match only its first tokens)."""
        node, path, n = self.roots.get(weights), [], 0
        bs, end = self.block_size, len(tokens) if limit is None else min(limit, len(tokens))
        while node is not None and n < end:
            rest = tokens[n:end]
            child = node.children.get(tuple(rest[:bs])) if len(rest) >= bs else None
            if child is None:  # the longest partial match among the children
                best = max(node.children.values(), default=None,
                           key=lambda c: _common_prefix(c.tokens, rest))
                k = 0 if best is None else _common_prefix(best.tokens, rest)
                if k:
                    path.append(best)
                return path, n + k
            path.append(child)
            n += bs
            node = child
        return path, n

    def insert(self, blocks: list[int], tokens, weights=None) -> None:
        """Index `blocks`, which hold `tokens` and which the caller holds.

        A node is only ever added under a node whose block the caller holds, so a holder of a
        block holds its index ancestors too: a block only the index holds has no held
        descendants, and leaf-first eviction can free every such block."""
        node = self.roots.setdefault(weights, Node(-1, ()))
        bs, path = self.block_size, []
        for k, b in enumerate(blocks):
            toks = tuple(tokens[k * bs: (k + 1) * bs])
            if not toks:
                break
            child = node.children.get(toks)
            if child is None:
                if b in self.nodes or any(_common_prefix(c.tokens, toks) == len(toks)
                                          for c in node.children.values()):
                    break  # cached elsewhere already, or a prefix of a cached block
                child = Node(b, toks, node, node.depth + 1)
                node.children[toks] = child
                self.pool.cache(b)
                self.nodes[b] = child
            elif child.block != b:
                break  # the same tokens sit in another block: this one stays private
            path.append(child)
            node = child
        self.touch(path)

    def touch(self, path: list[Node]) -> None:
        """Mark a root-first path as just used."""
        # one clock value for the whole path: a parent is never older than its children, so
        # (last_use, -depth) order evicts leaves first
        self._clock += 1
        for node in path:
            node.last_use = self._clock

    def evict(self, n: int) -> None:
        """Give up to n blocks that only the index holds back to the pool, least recently
        used first."""
        idle = sorted((node for b, node in self.nodes.items() if self.pool.refcount[b] == 1),
                      key=lambda node: (node.last_use, -node.depth))
        for node in idle[:n]:
            assert not node.children, "an index node evicted before its children"
            del node.parent.children[node.tokens]
            del self.nodes[node.block]
            self.evicted += 1
            self.pool.uncache(node.block)

    def clear(self) -> None:
        """Forget every cached prefix (blocks that others hold stay theirs)."""
        for b in self.nodes:
            self.pool.uncache(b)
        self.nodes = {}
        self.roots.clear()
