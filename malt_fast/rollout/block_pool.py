"""The KV cache's blocks as ids with reference counts: allocation, sharing, copy-on-write.

The pool knows nothing of tokens, tensors or sequences. Whoever holds a block holds a reference
to it; a block nobody holds is free. A cache that keeps blocks past their holders (the prefix
index) takes a reference of its own with `cache(b)`: a cached block that only the cache holds
is idle, reclaimable, and counts as available, but only its cache gives it back (`uncache`).
"""

from __future__ import annotations

from malt_fast.errors import MaltError


class CacheFull(MaltError):
    """The pool has fewer free blocks than an operation needs."""


class BlockPool:
    """Block ids 0 .. num_blocks-1. `peak_held` is the most blocks held at once, idle ones not
    counted (the pool fills up with them and gives them back on demand)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        # pop() hands out low block ids first, which keeps tests readable
        self.free = list(range(num_blocks - 1, -1, -1))
        self.cached: set[int] = set()
        self.idle = 0  # cached blocks whose only reference is the cache's
        self.peak_held = 0

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def held(self) -> int:
        """Blocks some holder other than a cache holds."""
        return self.used - self.idle

    def available(self) -> int:
        """Blocks an allocation can get once the cache gives its idle blocks back."""
        return len(self.free) + self.idle

    def alloc(self) -> int:
        """A free block with one reference, the caller's."""
        if not self.free:
            raise CacheFull(f"KV cache full: all {self.num_blocks} blocks are in use; build the "
                            f"engine with more cache blocks")
        b = self.free.pop()
        self.refcount[b] = 1
        self.peak_held = max(self.peak_held, self.held)
        return b

    def incref(self, b: int) -> None:
        if self.refcount[b] == 1 and b in self.cached:  # an idle block is taken up again
            self.idle -= 1
            self.refcount[b] = 2
            self.peak_held = max(self.peak_held, self.held)
        else:
            self.refcount[b] += 1

    def decref(self, b: int) -> None:
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            self.free.append(b)
        elif self.refcount[b] == 1 and b in self.cached:
            self.idle += 1

    def share(self, blocks: list[int]) -> None:
        """One more reference to each block (a fork, or a cached prefix handed out)."""
        for b in blocks:
            self.incref(b)

    def writable(self, b: int) -> int:
        """The block to write b's contents into: b itself if the caller is its only holder,
        else a fresh block that takes over the caller's reference (the caller copies the
        contents over). Raises CacheFull, with nothing changed, when a copy finds no block."""
        if self.refcount[b] == 1:
            return b
        new = self.alloc()
        self.decref(b)
        return new

    def cache(self, b: int) -> None:
        """The cache's own reference to b, which the caller holds (so b is not idle yet)."""
        assert self.refcount[b] > 0 and b not in self.cached, f"cache({b}): free or cached"
        self.cached.add(b)
        self.refcount[b] += 1

    def uncache(self, b: int) -> None:
        """The cache lets b go: freed if the cache was its only holder."""
        self.cached.remove(b)
        if self.refcount[b] == 1:
            self.idle -= 1
        self.decref(b)
