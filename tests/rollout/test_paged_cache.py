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
    assert refs == cache.refcount
    assert sorted(cache.free) == [b for b in range(cache.num_blocks) if refs[b] == 0]


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
    assert cache.used_blocks == 0 and sorted(cache.free) == list(range(16))


def test_full_pool_raises_with_sizes():
    cache = PagedKVCache(CFG, num_blocks=2, block_size=4, decode_backend="torch")
    sid = cache.new_sequence()
    write(cache, sid, [1.0] * 8)
    with pytest.raises(CacheFull, match="needs 1 free blocks, 0 of 2"):
        write(cache, sid, [2.0])
    assert read(cache, sid) == [1.0] * 8
