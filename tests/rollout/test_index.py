"""PrefixIndex alone, over a bare BlockPool: the caller plays the sequences, holding blocks."""

from malt_fast.rollout.block_pool import BlockPool
from malt_fast.rollout.prefix_index import PrefixIndex

BS = 4


def written(pool, index, tokens, weights=None, release=True):
    """Blocks holding `tokens` (allocated as a sequence would), indexed; released after unless
    `release` is False."""
    blocks = [pool.alloc() for _ in range(-(-len(tokens) // BS))]
    index.insert(blocks, tokens, weights)
    if release:
        for b in blocks:
            pool.decref(b)
    return blocks


def test_match_to_the_token_with_the_same_weights():
    pool = BlockPool(16)
    index = PrefixIndex(pool, BS)
    ctx = list(range(1, 12))  # blocks [1-4] [5-8] [9-11]
    blocks = written(pool, index, ctx, "a")
    assert pool.idle == 3 and pool.held == 0
    for tokens, weights, limit, n in [
            (ctx, "a", None, 11), (ctx + [99], "a", None, 11), (ctx[:6] + [0, 0], "a", None, 6),
            (ctx[:4] + [7], "a", None, 4), (ctx[:2] + [9], "a", None, 2), ([5] + ctx, "a", None, 0),
            (ctx, "a", 10, 10), (ctx, "a", 4, 4), (ctx, "b", None, 0), (ctx, None, None, 0)]:
        path, got = index.match(tokens, weights, limit)
        assert got == n, (tokens, weights, limit)
        assert [node.block for node in path] == blocks[:-(-n // BS)]
    assert pool.refcount[:3] == [1, 1, 1]  # matching takes no references


def test_insert_keeps_one_block_per_prefix():
    pool = BlockPool(16)
    index = PrefixIndex(pool, BS)
    first = written(pool, index, [1, 2, 3, 4, 5, 6], release=False)
    assert pool.refcount[first[0]] == pool.refcount[first[1]] == 2  # the holder's + the index's
    # the same tokens in other blocks: the cached ones stay, the new ones are not indexed
    again = written(pool, index, [1, 2, 3, 4, 5, 6], release=False)
    assert set(index.nodes) == set(first) and pool.refcount[again[0]] == 1

    def after_first(tail_tokens):  # a holder sharing first's full block, with its own tail
        pool.incref(first[0])
        tail = pool.alloc()
        index.insert([first[0], tail], [1, 2, 3, 4] + tail_tokens)
        return tail

    # a prefix of a cached partial block adds nothing; a longer sibling is its own node
    assert after_first([5]) not in index.nodes
    assert after_first([5, 6, 7]) in index.nodes
    assert index.match([1, 2, 3, 4, 5, 6, 7, 8])[1] == 7
    assert index.match([1, 2, 3, 4, 5, 6, 0])[1] == 6


def test_eviction_lru_leaves_first_gives_blocks_back():
    pool = BlockPool(8)
    index = PrefixIndex(pool, BS)
    x = written(pool, index, list(range(10, 18)), "x")  # 2 blocks each, used in this order
    y = written(pool, index, list(range(20, 28)), "y")
    z = written(pool, index, list(range(30, 38)), "z")
    index.touch(index.match(list(range(10, 18)), "x")[0])  # x is now the most recent
    assert pool.idle == 6 and len(pool.free) == 2
    index.evict(3)  # y's leaf, then y's root, then z's leaf
    assert index.evicted == 3 and sorted(pool.free) == sorted([6, 7, *y, z[1]])
    assert index.match(list(range(20, 28)), "y")[1] == 0
    assert index.match(list(range(30, 38)), "z")[1] == 4
    assert index.match(list(range(10, 18)), "x")[1] == 8


def test_eviction_never_takes_a_held_block():
    pool = BlockPool(8)
    index = PrefixIndex(pool, BS)
    held = written(pool, index, list(range(8)), "x", release=False)  # held, oldest
    idle = written(pool, index, list(range(20, 28)), "y")
    index.evict(10)  # more than there is: only the idle ones go
    assert index.evicted == 2 and set(index.nodes) == set(held)
    assert sorted(pool.free) == sorted([*idle, 4, 5, 6, 7])
    # a holder's blocks become idle when it lets go, and evictable then
    for b in held:
        pool.decref(b)
    assert pool.idle == 2
    index.evict(1)
    assert set(index.nodes) == {held[0]} and pool.refcount[held[0]] == 1


def test_clear_gives_back_what_only_the_index_holds():
    pool = BlockPool(8)
    index = PrefixIndex(pool, BS)
    held = written(pool, index, list(range(8)), "x", release=False)
    written(pool, index, list(range(20, 26)), "y")
    index.clear()
    assert not index.nodes and not pool.cached and pool.idle == 0
    assert pool.used == 2 and [pool.refcount[b] for b in held] == [1, 1]
    assert index.match(list(range(8)), "x") == ([], 0)
