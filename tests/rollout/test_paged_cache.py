"""Paged cache bookkeeping under random fork / append / truncate / release sequences."""

import random

import pytest
import torch

from malt_fast.model.llama import LlamaConfig
from malt_fast.rollout.paged_cache import CacheFull, PagedKVCache

CFG = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=4)


def write(cache, sid, values):
    """Append tokens whose key/value vectors are filled with the given numbers."""
    cache.begin([sid], [len(values)])
    k = torch.tensor(values, dtype=torch.float32)[None, None, :, None].expand(1, 1, -1, 4)
    q = torch.zeros(1, 2, len(values), 4)
    for layer in range(CFG.num_hidden_layers):
        cache.attend(layer, q, k + layer, -(k + layer))


def read(cache, sid):
    seq = cache.seqs[sid]
    bs = cache.block_size
    out = []
    for layer in range(CFG.num_hidden_layers):
        rows = [cache.k[layer, seq.blocks[t // bs], t % bs, 0, 0].item() - layer
                for t in range(seq.length)]
        vrows = [-cache.v[layer, seq.blocks[t // bs], t % bs, 0, 0].item() - layer
                 for t in range(seq.length)]
        assert rows == vrows
        out.append(rows)
    assert all(o == out[0] for o in out)
    return out[0]


def check_invariants(cache, shadow):
    refs = [0] * cache.num_blocks
    for sid, seq in cache.seqs.items():
        assert len(seq.blocks) == cache.blocks_for(seq.length)
        for b in seq.blocks:
            refs[b] += 1
        assert read(cache, sid) == shadow[sid]
    assert refs == cache.pool.refcount
    assert sorted(cache.pool.free) == [b for b in range(cache.num_blocks) if refs[b] == 0]


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_contents_and_refcounts(seed):
    rng = random.Random(seed)
    cache = PagedKVCache(CFG, num_blocks=40, block_size=4, decode_backend="torch")
    shadow: dict[int, list[float]] = {}
    counter = iter(range(1, 10**6))
    for _ in range(150):
        op = rng.choice(["new", "append", "append", "fork", "release", "truncate"])
        live = list(shadow)
        try:
            if op == "new" or not live:
                sid = cache.new_sequence()
                shadow[sid] = []
            elif op == "append":
                sid = rng.choice(live)
                vals = [float(next(counter)) for _ in range(rng.randint(1, 7))]
                write(cache, sid, vals)
                shadow[sid] += vals
            elif op == "fork":
                sid = rng.choice(live)
                for child in cache.fork(sid, rng.randint(1, 3)):
                    shadow[child] = list(shadow[sid])
            elif op == "release":
                sid = rng.choice(live)
                cache.release(sid)
                del shadow[sid]
            else:
                sid = rng.choice(live)
                keep = rng.randint(0, len(shadow[sid]))
                cache.truncate(sid, keep)
                shadow[sid] = shadow[sid][:keep]
        except CacheFull:
            pass  # a full pool must refuse without touching any sequence's contents
        check_invariants(cache, shadow)


def test_fork_shares_full_blocks_and_copies_partial_tail_on_write():
    cache = PagedKVCache(CFG, num_blocks=16, block_size=4, decode_backend="torch")
    parent = cache.new_sequence()
    write(cache, parent, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # one full block + half a block
    a, b = cache.fork(parent, 2)
    assert cache.used_blocks == 2
    write(cache, a, [7.0])
    write(cache, b, [8.0])
    assert cache.seqs[a].blocks[0] == cache.seqs[b].blocks[0] == cache.seqs[parent].blocks[0]
    tails = {cache.seqs[s].blocks[1] for s in (parent, a, b)}
    assert len(tails) == 3 and cache.used_blocks == 4
    assert read(cache, a) == [1, 2, 3, 4, 5, 6, 7] and read(cache, b) == [1, 2, 3, 4, 5, 6, 8]
    assert read(cache, parent) == [1, 2, 3, 4, 5, 6]
    for s in (parent, a, b):
        cache.release(s)
    assert cache.used_blocks == 0 and sorted(cache.pool.free) == list(range(16))


def test_full_pool_raises_with_sizes():
    cache = PagedKVCache(CFG, num_blocks=2, block_size=4, decode_backend="torch")
    sid = cache.new_sequence()
    write(cache, sid, [1.0] * 8)
    with pytest.raises(CacheFull, match="needs 1 free blocks, 0 of 2"):
        write(cache, sid, [2.0])
    assert read(cache, sid) == [1.0] * 8


# ---------------------------------------------------------------- prefix index


def indexed_refs(cache):
    """Blocks the index holds (one reference each)."""
    return set(cache.index.nodes)


def check_index(cache):
    refs = [0] * cache.num_blocks
    for seq in cache.seqs.values():
        for b in seq.blocks:
            refs[b] += 1
    for b in indexed_refs(cache):
        refs[b] += 1
    assert refs == cache.pool.refcount
    assert sorted(cache.pool.free) == [b for b in range(cache.num_blocks) if refs[b] == 0]
    assert cache.idle_blocks == sum(1 for b in indexed_refs(cache) if refs[b] == 1)
    held = sum(1 for b in range(cache.num_blocks) if refs[b] > (b in indexed_refs(cache)))
    assert cache.held_blocks == held <= cache.peak_used


def test_index_gives_the_longest_prefix_of_the_same_weights_to_the_token():
    cache = PagedKVCache(CFG, num_blocks=32, block_size=4, decode_backend="torch")
    ctx = [float(t) for t in range(1, 12)]  # 11 tokens: blocks [1-4] [5-8] [9-11]
    sid = cache.new_sequence()
    write(cache, sid, ctx)
    cache.remember(sid, ctx, "a")
    cache.release(sid)
    assert cache.held_blocks == 0 and cache.idle_blocks == 3
    check_index(cache)
    for tokens, weights, expect in [
            (ctx, "a", 11), (ctx + [99.0], "a", 11), (ctx[:6] + [0.0, 0.0], "a", 6),
            (ctx[:4] + [7.0], "a", 4), (ctx[:2] + [9.0], "a", 2), ([5.0] + ctx, "a", 0),
            (ctx, "b", 0), (ctx, None, 0)]:
        new, n = cache.adopt(tokens, weights)
        assert n == expect
        assert read(cache, new) == tokens[:n]  # the cached keys are these tokens' own
        write(cache, new, tokens[n:] + [50.0])  # a partly matched block is copied, not changed
        assert read(cache, new) == tokens + [50.0]
        cache.release(new)
        check_index(cache)
    again, n = cache.adopt(ctx, "a")
    assert n == 11 and read(cache, again) == ctx
    new, n = cache.adopt(ctx, "a", limit=10)  # the engine always computes the last token
    assert n == 10 and read(cache, new) == ctx[:10]


def test_eviction_takes_idle_blocks_lru_and_never_held_ones():
    cache = PagedKVCache(CFG, num_blocks=6, block_size=4, decode_backend="torch")
    prompts = {w: [float(10 * i + t) for t in range(8)] for i, w in enumerate("xyz")}
    for w, p in prompts.items():  # 2 blocks each, all idle after release
        sid = cache.new_sequence()
        write(cache, sid, p)
        cache.remember(sid, p, w)
        cache.release(sid)
    held, n = cache.adopt(prompts["x"], "x")  # x is now the most recent and held
    assert n == 8 and cache.held_blocks == 2 and cache.idle_blocks == 4 and not cache.pool.free
    big = cache.new_sequence()
    write(cache, big, [7.0] * 9)  # needs 3 blocks: y's two (least recent), then one of z's
    assert cache.evicted == 3
    assert cache.index.match(prompts["y"], "y") == ([], 0)
    assert cache.index.match(prompts["z"], "z")[1] == 4  # its leaf went
    assert read(cache, held) == prompts["x"]
    check_index(cache)
    with pytest.raises(CacheFull):  # z's first block is the last idle one; x is held
        write(cache, big, [7.0] * 8)
    assert read(cache, big) == [7.0] * 9 and read(cache, held) == prompts["x"]
    check_index(cache)
    cache.release(held)
    write(cache, big, [7.0] * 8)  # now x's blocks may go
    assert read(cache, big) == [7.0] * 17
    check_index(cache)


@pytest.mark.parametrize("seed", range(4))
def test_random_index_operations_keep_contents_and_refcounts(seed):
    """Sequences adopt cached prefixes, extend them, are remembered and released, under a pool
    small enough to evict: every sequence reads back its own tokens, refcounts stay exact."""
    rng = random.Random(seed)
    cache = PagedKVCache(CFG, num_blocks=24, block_size=4, decode_backend="torch")
    stems = [[float(rng.randrange(1, 5)) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
    live = {}
    for _ in range(120):
        if live and (rng.random() < 0.4 or len(live) > 3):
            sid = rng.choice(list(live))
            if rng.random() < 0.7:
                cache.remember(sid, live[sid], rng.choice("ab"))
            cache.release(sid)
            del live[sid]
        else:
            w = rng.choice("ab")
            tokens = rng.choice(stems) + [float(rng.randrange(1, 5))
                                          for _ in range(rng.randrange(1, 6))]
            try:
                sid, n = cache.adopt(tokens, w, len(tokens) - 1)
                assert n == cache.index.match(tokens, w, len(tokens) - 1)[1]
                write(cache, sid, tokens[n:])
            except CacheFull:
                cache.release(sid)
                check_index(cache)
                continue
            live[sid] = tokens
            cache.remember(sid, tokens, w)
        for sid, tokens in live.items():
            assert read(cache, sid) == tokens
        check_index(cache)


def test_packed_prefill_equals_padded_rows():
    """begin_packed: the rows' new tokens end to end in one row, each attending its own cached
    context; the same outputs and cache contents as right-padded rows."""
    g = torch.Generator().manual_seed(0)
    caches = [PagedKVCache(CFG, num_blocks=32, block_size=4, decode_backend="torch")
              for _ in range(2)]
    prefix, n_new = [5, 0, 11, 2], [3, 6, 1, 9]
    for cache in caches:
        sids = [cache.new_sequence() for _ in prefix]
        for sid, n in zip(sids, prefix):
            if n:
                write(cache, sid, [float(sid * 100 + t) for t in range(n)])
        shared = cache.fork(sids[2], 1)[0]  # a forked row: its partial tail is copied on write
    rows = sids + [shared]
    n_new = n_new + [2]
    q = [torch.randn(1, 2, n, 4, generator=g) for n in n_new]
    k = [torch.randn(1, 1, n, 4, generator=g) for n in n_new]
    v = [torch.randn(1, 1, n, 4, generator=g) for n in n_new]
    padded, packed = caches
    T = max(n_new)

    def pad(xs):
        return torch.cat([torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[2])) for x in xs])

    pos = padded.begin(rows, n_new)
    want = padded.attend(0, pad(q), pad(k), pad(v))
    pos_packed = packed.begin_packed(rows, n_new)
    got = packed.attend(0, torch.cat(q, 2), torch.cat(k, 2), torch.cat(v, 2))
    assert pos_packed[0].tolist() == [p for i, n in enumerate(n_new) for p in pos[i, :n].tolist()]
    at = 0
    for i, n in enumerate(n_new):
        torch.testing.assert_close(got[:, :, at:at + n], want[i:i + 1, :, :n], rtol=1e-5, atol=1e-6)
        at += n
    for sid in rows:
        assert padded.seqs[sid].length == packed.seqs[sid].length
        for layer in range(1):
            b_pad, b_pack = padded.seqs[sid].blocks, packed.seqs[sid].blocks
            assert torch.equal(padded.k[layer, b_pad], packed.k[layer, b_pack])
