"""Scheduler alone, on a cache with no model: admission under slots, blocks and the prefill
token budget; prefill rows; retirement of ended branches."""

import pytest

from malt_fast.errors import MaltError
from malt_fast.model.llama import LlamaConfig
from malt_fast.rollout.paged_cache import CacheFull, PagedKVCache
from malt_fast.rollout.scheduler import Completion, Request, Scheduler

CFG = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=4)


def scheduler(requests, num_blocks=64, max_batch=64, max_prefill_tokens=4096, reuse=True):
    cache = PagedKVCache(CFG, num_blocks, block_size=4, decode_backend="torch")
    return Scheduler(cache, requests, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens,
                     prefix_reuse=reuse)


def filled(cache, tokens):
    """A cache sequence holding len(tokens) tokens (the scheduler never reads their values)."""
    sid = cache.new_sequence()
    cache.reserve(sid, len(tokens))
    cache.seqs[sid].length = len(tokens)
    return sid


def started(s, reqs):
    """What the engine does around its prefill forward, less the forward."""
    rows = s.prefill_rows(reqs)
    for row in rows:
        s.cache.reserve(row.seq, len(row.tokens))
        s.cache.seqs[row.seq].length += len(row.tokens)
    return s.start(rows)


def end(branches, tokens=(7,)):
    for b in branches:
        b.tokens = list(tokens)
        b.result = Completion(list(tokens), "eos")


def test_admission_waits_for_blocks():
    # each: prefill 2 + 1 blocks, then 2 branches of 2 + 1: 9 blocks at worst
    reqs = [Request([10 * i + t for t in range(8)], 2, 8) for i in range(3)]
    s = scheduler(reqs, num_blocks=20)
    assert s.worst_blocks(reqs[0]) == 9
    assert s.admit() == reqs[:2] and list(s.waiting) == reqs[2:]
    branches = started(s, reqs[:2])
    assert len(s.running) == 4 and s.cache.used_blocks == 4
    # 16 blocks left, the running branches may still take 4 x 3: the third request waits
    assert s.admit() == []
    end(branches[:2])  # the first request ends: its sequences go back
    assert s.retire() == branches[:2] and s.running == branches[2:]
    assert s.admit() == reqs[2:] and not s.waiting


def test_admission_waits_for_slots_and_the_prefill_budget():
    reqs = [Request([10 * i + t for t in range(8)], 2, 4) for i in range(3)]
    s = scheduler(reqs, max_batch=5)
    assert s.admit() == reqs[:2]  # slots for 2 x 2 branches of 5
    s = scheduler(reqs, max_prefill_tokens=20)
    assert s.admit() == reqs[:2]  # 8 + 8 prefill tokens, not 24
    s = scheduler(reqs, max_prefill_tokens=5)
    assert s.admit() == reqs[:1]  # one request always goes, whatever its length


def test_a_request_sharing_an_uncached_prefix_waits_for_it():
    stem = list(range(12))
    a, b, c = Request(stem, 1, 4), Request(stem[:9] + [50], 1, 4), Request([60, 61], 1, 4)
    s = scheduler([a, b, c])
    assert s.admit() == [a, c] and list(s.waiting) == [b]  # b shares 2 blocks with a
    started(s, [a, c])  # a's context is indexed now
    assert s.admit() == [b]
    row, = s.prefill_rows([b])
    assert row.tokens == [50]  # only what the cached prefix lacks


def test_admission_errors_name_the_sizes():
    with pytest.raises(CacheFull, match="needs up to 9 blocks of 4, the cache has 8"):
        scheduler([Request(list(range(8)), 2, 8)], num_blocks=8).admit()
    with pytest.raises(MaltError, match="n=3 branches, more than the engine's max_batch=2"):
        scheduler([Request([1], 3, 4)], max_batch=2).admit()
    s = scheduler([Request(list(range(12)), 1, 4, keep=True), Request([1, 2], 1, 8)],
                  num_blocks=8)
    branch, = started(s, s.admit())
    s.cache.reserve(branch.seq, 4)
    s.cache.seqs[branch.seq].length += 4
    end([branch], tokens=[1, 2, 3, 4, 5])
    s.retire()  # a kept sequence holds 4 blocks: the next request's 5 do not fit
    with pytest.raises(CacheFull, match="4 of 8 blocks are held by kept sequences"):
        s.admit()


def test_prefill_rows_from_a_parent_and_without_reuse():
    ctx = list(range(10))
    for reuse in (True, False):
        s = scheduler([], reuse=reuse)
        parent = filled(s.cache, ctx[:6])
        rows = s.prefill_rows([Request(ctx, 3, 4, parent=parent)])
        if reuse:  # one row, from the parent on, starting every branch
            assert [(r.seq, r.tokens, r.branches) for r in rows] == [(parent, ctx[6:], [0, 1, 2])]
        else:  # a row per branch, from scratch; the parent is let go
            assert [(r.tokens, r.branches) for r in rows] == [(ctx, [j]) for j in range(3)]
            assert parent not in s.cache.seqs
    s = scheduler([])
    with pytest.raises(ValueError, match="must extend its parent"):
        s.prefill_rows([Request(ctx[:6], 1, 4, parent=filled(s.cache, ctx[:6]))])


def test_retire_keeps_or_releases_and_reports_whole_requests():
    done = []
    kept = Request(list(range(6)), 2, 8, keep=True, on_done=lambda r, c: done.append((r, c)))
    dropped = Request(list(range(20, 26)), 1, 8, on_done=lambda r, c: done.append((r, c)))
    s = scheduler([kept, dropped])
    branches = started(s, s.admit())
    for b in branches:  # each decoded 3 tokens; the cache holds all but the last
        s.cache.reserve(b.seq, 2)
        s.cache.seqs[b.seq].length += 2
    end(branches[:1], tokens=[1, 2, 3])
    assert s.retire() == branches[:1] and done == []  # kept's other branch still runs
    end(branches[1:], tokens=[4, 5, 6])
    s.retire()
    assert [r for r, _ in done] == [kept, dropped] and not s.running
    comps = done[0][1]
    assert [c.tokens for c in comps] == [[1, 2, 3], [4, 5, 6]]
    assert [s.cache.length(c.seq) for c in comps] == [8, 8]  # context + tokens but the last
    assert done[1][1][0].seq is None and branches[2].seq not in s.cache.seqs
    assert s.cache.held_blocks == 3  # kept's shared first block and a tail block each
