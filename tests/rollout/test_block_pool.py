"""BlockPool alone: block ids and reference counts, no tensors, tokens or sequences."""

import random

import pytest

from malt_fast.rollout.block_pool import BlockPool, CacheFull


def check(pool):
    assert sorted(pool.free) == [b for b in range(pool.num_blocks) if pool.refcount[b] == 0]
    assert len(set(pool.free)) == len(pool.free)
    assert pool.idle == sum(1 for b in pool.cached if pool.refcount[b] == 1)
    assert pool.used == pool.num_blocks - len(pool.free)
    assert pool.held == pool.used - pool.idle <= pool.peak_held
    assert pool.available() == len(pool.free) + pool.idle


def test_alloc_hands_out_low_ids_and_free_on_last_reference():
    pool = BlockPool(4)
    a, b = pool.alloc(), pool.alloc()
    assert (a, b) == (0, 1) and pool.refcount[:2] == [1, 1] and pool.used == 2
    pool.share([a, b])
    pool.incref(a)
    assert pool.refcount[:2] == [3, 2]
    pool.decref(a)
    pool.decref(a)
    pool.decref(b)
    assert pool.refcount[:2] == [1, 1] and pool.used == 2
    pool.decref(a)
    assert a in pool.free and pool.used == 1 and pool.peak_held == 2
    assert pool.alloc() == a  # the block just freed is handed out next
    check(pool)


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(2)
    a, b = pool.alloc(), pool.alloc()
    with pytest.raises(CacheFull, match="all 2 blocks are in use"):
        pool.alloc()
    pool.incref(a)
    with pytest.raises(CacheFull):  # a copy needs a block too
        pool.writable(a)
    assert pool.refcount == [2, 1] and pool.free == []
    check(pool)


def test_writable_copies_only_a_shared_block():
    pool = BlockPool(4)
    a = pool.alloc()
    assert pool.writable(a) == a  # the caller's alone: written in place
    pool.incref(a)  # now two holders, e.g. a fork
    new = pool.writable(a)
    assert new != a and pool.refcount[a] == 1 and pool.refcount[new] == 1
    assert pool.writable(a) == a  # the other holder is alone with it now
    check(pool)


def test_cached_blocks_go_idle_and_come_back():
    pool = BlockPool(3)
    a = pool.alloc()
    pool.cache(a)  # the cache's own reference: a outlives its holder
    assert pool.refcount[a] == 2 and pool.idle == 0
    pool.decref(a)
    assert pool.refcount[a] == 1 and pool.idle == 1 and pool.held == 0
    assert pool.available() == 3 and a not in pool.free
    pool.incref(a)  # taken up again
    assert pool.idle == 0 and pool.held == 1
    pool.decref(a)
    pool.uncache(a)  # the cache lets an idle block go: freed
    assert a in pool.free and pool.idle == 0 and not pool.cached
    b = pool.alloc()
    pool.cache(b)
    pool.uncache(b)  # still held: only the cache's reference goes
    assert pool.refcount[b] == 1 and b not in pool.free
    check(pool)


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_counts(seed):
    rng = random.Random(seed)
    pool = BlockPool(12)
    held: list[int] = []  # one entry per reference a holder has
    for _ in range(400):
        op = rng.choice(["alloc", "share", "drop", "write", "cache", "uncache"])
        try:
            if op == "alloc" or not held:
                held.append(pool.alloc())
            elif op == "share":
                b = rng.choice(held)
                pool.share([b])
                held.append(b)
            elif op == "drop":
                pool.decref(held.pop(rng.randrange(len(held))))
            elif op == "write":
                i = rng.randrange(len(held))
                held[i] = pool.writable(held[i])
            elif op == "cache":
                b = rng.choice(held)
                if b not in pool.cached:
                    pool.cache(b)
            elif pool.cached:
                pool.uncache(rng.choice(sorted(pool.cached)))
        except CacheFull:
            assert not pool.free
        refs = [held.count(b) + (b in pool.cached) for b in range(pool.num_blocks)]
        assert refs == pool.refcount
        check(pool)
