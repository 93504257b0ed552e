"""Paged decode attention kernels against plain attention over contiguous per-sequence K/V."""

import math

import numpy as np

import pytest
import torch

from malt_fast.rollout.paged_cache import cpp_decode_attention, reference_decode_attention


def build_paged(lengths, shared, Hkv, D, bs, dtype, seed=0):
    """Contiguous K/V per sequence, then the same values scattered into a shuffled block pool.

    shared[i] = (j, m): sequence i starts with the first m tokens of sequence j (m a multiple of
    bs, so the blocks themselves are shared, as after a fork).
    """
    g = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for i, n in enumerate(lengths):
        k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
        if shared[i] is not None:
            j, m = shared[i]
            k[:m], v[:m] = ks[j][:m], vs[j][:m]
        ks.append(k.to(dtype))
        vs.append(v.to(dtype))
    total = sum(-(-n // bs) for n in lengths) + 3
    order = torch.randperm(total, generator=g).tolist()
    k_pool = torch.full((total, bs, Hkv, D), float("nan"), dtype=dtype)  # unused slots poison
    v_pool = torch.full((total, bs, Hkv, D), float("nan"), dtype=dtype)
    tables = []
    for i, n in enumerate(lengths):
        blocks = []
        for b in range(-(-n // bs)):
            if shared[i] is not None and (b + 1) * bs <= shared[i][1]:
                blocks.append(tables[shared[i][0]][b])  # reuse the parent's block in place
                continue
            blk = order.pop()
            rows = slice(b * bs, min(n, (b + 1) * bs))
            k_pool[blk, : rows.stop - rows.start] = ks[i][rows]
            v_pool[blk, : rows.stop - rows.start] = vs[i][rows]
            blocks.append(blk)
        tables.append(blocks)
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return ks, vs, k_pool, v_pool, table_t, torch.tensor(lengths, dtype=torch.int32)


def plain_attention(q, ks, vs, scale):
    """fp64 softmax attention of q [B, Hq, D] over each sequence's contiguous K/V."""
    out = []
    for b in range(q.shape[0]):
        k = ks[b].double().repeat_interleave(q.shape[1] // ks[b].shape[1], dim=1)
        v = vs[b].double().repeat_interleave(q.shape[1] // vs[b].shape[1], dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
    return torch.stack(out)


CASES = [
    # lengths, shared prefixes, Hq, Hkv, D, block size
    ([7, 33, 1, 16], [None, None, None, None], 4, 4, 16, 8),
    ([37, 45, 38, 70, 19], [None, (0, 32), (0, 32), (1, 40), (0, 16)], 8, 2, 32, 8),
    ([129, 131, 250], [None, (0, 128), (1, 128)], 9, 3, 64, 16),
]


@pytest.mark.parametrize("kernel", [cpp_decode_attention, reference_decode_attention],
                         ids=["cpp", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_decode_matches_plain_attention(kernel, dtype, tol, case):
    lengths, shared, Hq, Hkv, D, bs = CASES[case]
    ks, vs, k_pool, v_pool, tables, lens = build_paged(lengths, shared, Hkv, D, bs, dtype, case)
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    scale = 1 / math.sqrt(D)
    out = kernel(q, k_pool, v_pool, tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    ref = plain_attention(q, ks, vs, scale)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_cpp_rejects_mismatched_dtypes():
    _, _, k_pool, v_pool, tables, lens = build_paged([5], [None], 2, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpp_decode_attention(torch.randn(1, 2, 8).bfloat16(), k_pool, v_pool, tables, lens, 1.0)


class ForkPool:
    """A block pool filled the way the paged cache fills it: a fork shares its parent's full
    blocks (same ids, same table positions) and gets a copy of the partial last block; tokens
    go into the sequence's last block until it is full. Unused slots hold NaN."""

    def __init__(self, num_blocks, bs, Hkv, D, gen):
        self.bs, self.gen = bs, gen
        self.k = torch.full((num_blocks, bs, Hkv, D), float("nan"), dtype=torch.float64)
        self.v = torch.full((num_blocks, bs, Hkv, D), float("nan"), dtype=torch.float64)
        self.free = torch.randperm(num_blocks, generator=gen).tolist()

    def new(self):
        return {"blocks": [], "len": 0}

    def fork(self, seq):
        full = seq["len"] // self.bs
        blocks = seq["blocks"][:full]
        if seq["len"] % self.bs:
            b = self.free.pop()
            self.k[b], self.v[b] = self.k[seq["blocks"][full]], self.v[seq["blocks"][full]]
            blocks.append(b)
        return {"blocks": blocks, "len": seq["len"]}

    def extend(self, seq, n):
        kv = torch.randn(2, n, *self.k.shape[2:], generator=self.gen, dtype=torch.float64)
        for i in range(n):
            pos = seq["len"] + i
            if pos % self.bs == 0:
                seq["blocks"].append(self.free.pop())
            self.k[seq["blocks"][pos // self.bs], pos % self.bs] = kv[0, i]
            self.v[seq["blocks"][pos // self.bs], pos % self.bs] = kv[1, i]
        seq["len"] += n
        return seq

    def batch(self, seqs, dtype):
        width = max(len(s["blocks"]) for s in seqs) + 2  # wider than needed, as in the engine
        tables = torch.zeros(len(seqs), width, dtype=torch.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s["blocks"])] = torch.tensor(s["blocks"], dtype=torch.int32)
        lens = torch.tensor([s["len"] for s in seqs], dtype=torch.int32)
        return self.k.to(dtype), self.v.to(dtype), tables, lens


def random_fork_tree(seed, bs, Hkv, D):
    """Rows of a G->V->R-like tree: prompts of random lengths (not multiples of bs), forked and
    extended over several levels; plus the corner cases: a row that only copies its parent's
    partial last block (its whole context shared but that block), a row whose whole context is
    its parent's full blocks, a row that shares nothing. Rows come shuffled."""
    import random

    rng = random.Random(seed)
    pool = ForkPool(256, bs, Hkv, D, torch.Generator().manual_seed(seed))
    rows = []
    for _ in range(rng.randint(1, 3)):  # questions
        root = pool.extend(pool.new(), rng.randint(1, 5 * bs))
        level = [root]
        for depth in range(rng.randint(2, 4)):
            nxt = []
            for parent in level:
                for _ in range(rng.randint(1, 3)):
                    nxt.append(pool.extend(pool.fork(parent), rng.randint(0, 3 * bs)))
            level = nxt
        rows += level
        rows.append(pool.fork(level[0]))  # nothing of its own
    aligned = pool.extend(pool.new(), 2 * bs)
    rows += [pool.fork(aligned), pool.fork(aligned), pool.extend(pool.new(), rng.randint(1, 70))]
    rng.shuffle(rows)
    return pool, rows


def cpp_paged(q, k_pool, v_pool, tables, lens, scale, shared=True):
    """The C++ op; shared=False: every row reads its whole context on its own."""
    import malt_fast._C  # noqa: F401  (registers the op)

    return torch.ops.malt_fast.paged_decode_attention(q, k_pool, v_pool, tables, lens, scale,
                                                      shared)


def paged_reference(q, k_pool, v_pool, tables, lens, scale):
    """The torch reference on fp64 copies of the inputs, on one thread (it is a few tiny ops per
    row; on a busy 2-core machine each multi-threaded op waits milliseconds for a thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_decode_attention(q.double(), k_pool.double(), v_pool.double(), tables,
                                          lens, scale)
    finally:
        torch.set_num_threads(threads)


# Hq, Hkv, D, block size: GQA groups of 3, 4, 1 and 2; D = 12 runs the plain loops (D % 8 != 0),
# D = 24 and 40 the vector tails; block sizes that are and are not multiples of 4 and 8
TREE_SHAPES = [(9, 3, 64, 16), (8, 2, 32, 8), (4, 4, 16, 4), (6, 3, 12, 5), (4, 2, 24, 16),
               (2, 1, 40, 7)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(len(TREE_SHAPES)))
def test_cpp_fork_trees_match_reference(seed, dtype, tol):
    Hq, Hkv, D, bs = TREE_SHAPES[seed]
    pool, rows = random_fork_tree(seed, bs, Hkv, D)
    k_pool, v_pool, tables, lens = pool.batch(rows, dtype)
    q = torch.randn(len(rows), Hq, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ref = paged_reference(q, k_pool, v_pool, tables, lens, D ** -0.5)
    for shared in (True, False):
        out = cpp_paged(q, k_pool, v_pool, tables, lens, D ** -0.5, shared)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_cpp_single_row_and_threads():
    """B = 1 (fewer rows than threads: items split by kv head) and a step big enough for the
    thread pool, with 1 and 2 threads: the same results."""
    pool, rows = random_fork_tree(11, 16, 3, 64)
    rows.insert(0, pool.extend(pool.fork(rows[0]), 500))  # alone, still big enough for threads
    while sum(r["len"] for r in rows) < 1500:  # big enough to run in parallel
        rows.append(pool.extend(pool.fork(rows[1]), 40))
    k_pool, v_pool, tables, lens = pool.batch(rows, torch.float32)
    q = torch.randn(len(rows), 9, 64, generator=torch.Generator().manual_seed(1))
    ref = paged_reference(q, k_pool, v_pool, tables, lens, 0.125)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = cpp_decode_attention(q, k_pool, v_pool, tables, lens, 0.125)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
            one = cpp_decode_attention(q[:1], k_pool, v_pool, tables[:1], lens[:1], 0.125)
            torch.testing.assert_close(one.double(), ref[:1], atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)],
                         ids=["fp32", "fp16"])
def test_cpp_any_tables(dtype, tol):
    """Tables no fork makes: the same block id in unrelated rows at different positions, twice
    in one row, shared at one position by rows whose other blocks differ, shared as a partial
    last block by rows of different lengths; identical rows; a row of length 0 (zeros)."""
    g = torch.Generator().manual_seed(5)
    bs, Hkv, D, Hq, nblocks = 8, 2, 32, 6, 12
    k_pool = torch.randn(nblocks, bs, Hkv, D, generator=g).to(dtype)
    v_pool = torch.randn(nblocks, bs, Hkv, D, generator=g).to(dtype)
    tables = torch.randint(0, nblocks, (24, 7), generator=g, dtype=torch.int32)
    lens = torch.randint(1, 7 * bs + 1, (24,), generator=g, dtype=torch.int32)
    tables[1, 3] = tables[1, 0] = tables[2, 5] = tables[3, 3]  # repeats, shared at position 3
    tables[4] = tables[5]  # identical tables: rows 4, 5 same length, row 6 shorter
    tables[6] = tables[5]
    lens[5], lens[6] = lens[4], max(1, int(lens[4]) - 3)
    tables[7, :2] = tables[8, :2]  # a shared prefix, each with its own length inside block 1
    lens[7], lens[8] = bs + 3, bs + 5
    lens[9] = 0
    q = torch.randn(24, Hq, D, generator=g).to(dtype)
    ref = paged_reference(q, k_pool, v_pool, tables, lens, 0.2)
    for shared in (True, False):
        out = cpp_paged(q, k_pool, v_pool, tables, lens, 0.2, shared)
        keep = lens > 0
        torch.testing.assert_close(out[keep].double(), ref[keep], atol=tol, rtol=tol)
        assert (out[9] == 0).all()


def test_cpp_rejects_bad_tables():
    _, _, k_pool, v_pool, tables, lens = build_paged([20], [None], 2, 8, 4, torch.float32)
    q = torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        cpp_decode_attention(q, k_pool, v_pool, tables + 1000, lens, 1.0)
    with pytest.raises(RuntimeError, match="more blocks"):
        cpp_decode_attention(q, k_pool, v_pool, tables, lens + 100, 1.0)


TRITON_CASES = [
    # branches forked from two parents (full shared blocks) plus one unrelated sequence
    ([40, 45, 52, 70, 37, 19], [None, (0, 32), (0, 32), None, (3, 32), None], 8, 2, 32, 16),
    ([17, 33, 35], [None, (0, 16), (1, 32)], 4, 4, 16, 16),
    # two rows whose whole context is the shared prefix (no tokens of their own)
    ([32, 32, 40], [None, (0, 32), (0, 32)], 4, 2, 16, 16),
]


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "flat"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(TRITON_CASES)))
def test_triton_cascade_matches_plain_attention(cascade, dtype, tol, case):
    from malt_fast.kernels.decode_attention import paged_decode_attention

    lengths, shared, Hq, Hkv, D, bs = TRITON_CASES[case]
    ks, vs, k_pool, v_pool, tables, lens = build_paged(lengths, shared, Hkv, D, bs, dtype, case)
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, D ** -0.5, cascade=cascade)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), plain_attention(q, ks, vs, D ** -0.5),
                               atol=tol, rtol=tol)


def test_cascade_reads_each_shared_prefix_once():
    from malt_fast.kernels.decode_attention import build_plan, upload_plan

    lengths, shared, Hq, Hkv, D, bs = TRITON_CASES[0]
    *_, tables, lens = build_paged(lengths, shared, Hkv, D, bs, torch.float32)
    plan = upload_plan(*build_plan(tables.numpy(), lens.numpy(), bs, Hkv, Hq // Hkv), "cpu")
    rows, heads, seqs, first, ntok = plan.shared
    # group {0,1,2} shares 2 blocks, group {3,4} shares 2 blocks: one item per (group, kv head)
    assert sorted(int((r >= 0).sum()) for r in rows) == [8, 8, 12, 12]
    assert ntok.tolist() == [32] * 4 and first.tolist() == [0] * 4
    own_rows, _, own_seqs, own_first, own_ntok = plan.own
    # members read their own blocks only from block 2 on; the others from block 0
    assert own_first.view(-1, Hkv)[:, 0].tolist() == [2, 2, 2, 2, 2, 0]
    assert own_ntok.view(-1, Hkv)[:, 0].tolist() == [8, 13, 20, 38, 5, 19]
    # each member's query rows point at their slots in the shared pass; the others at none
    slots = plan.slots.view(len(lengths), Hq)
    assert (slots[[0, 1, 2, 3, 4]] >= 0).all() and (slots[5] == -1).all()
    assert len(set(slots[slots >= 0].tolist())) == 5 * Hq
    read_blocks = ntok.sum() + own_ntok.sum()
    assert read_blocks < sum(lengths) * Hkv


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
def test_fixed_capacity_plan_matches_plain_attention(dtype, tol):
    """The CUDA-graph layout: items padded to a capacity, tables wider than needed, padding
    rows that attend a scratch block; real rows must come out exactly as without padding."""
    from malt_fast.kernels.decode_attention import build_plan, decode_with_plan, upload_plan

    lengths, shared, Hq, Hkv, D, bs = TRITON_CASES[0]
    ks, vs, k_pool, v_pool, tables, lens = build_paged(lengths, shared, Hkv, D, bs, dtype, 5)
    B, bucket, width = len(lengths), 8, tables.shape[1] + 3
    scratch = k_pool.shape[0] - 1  # a block no sequence uses (build_paged leaves spares)
    k_pool[scratch], v_pool[scratch] = 0.5, -0.5
    wide = torch.full((bucket, width), scratch, dtype=torch.int32)
    wide[:B, : tables.shape[1]] = tables
    padded_lens = torch.ones(bucket, dtype=torch.int32)
    padded_lens[:B] = lens
    plan = upload_plan(*build_plan(wide.long().numpy(), padded_lens.long().numpy(), bs, Hkv,
                                   Hq // Hkv, capacity=bucket), "cpu")
    q = torch.randn(bucket, Hq, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    out = decode_with_plan(q, k_pool, v_pool, wide, plan, D ** -0.5)
    torch.testing.assert_close(out[:B].double(), plain_attention(q[:B], ks, vs, D ** -0.5),
                               atol=tol, rtol=tol)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("seed", range(4))
def test_plan_covers_each_row_exactly_once(seed):
    """Random fork trees in a real paged cache: for every query row, the shared item it points
    to (if any) plus its own item read exactly the row's context, block by block, and no item
    mixes rows of different kv heads."""
    import random

    from malt_fast.kernels.decode_attention import build_plan, upload_plan
    from malt_fast.model.llama import LlamaConfig
    from malt_fast.rollout.paged_cache import PagedKVCache

    rng = random.Random(seed)
    bs, hkv, group = 4, 2, 3
    cfg = LlamaConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=hkv * group, num_key_value_heads=hkv)
    cache = PagedKVCache(cfg, 400, bs)
    seqs = []
    for _ in range(rng.randint(2, 6)):
        root = cache.new_sequence()
        cache.reserve(root, n := rng.randint(1, 30))
        cache.seqs[root].length = n
        family = [root]
        for _ in range(rng.randint(1, 3)):  # forks of forks, each extended a little
            child = cache.fork(rng.choice(family), 1)[0]
            cache.reserve(child, n := rng.randint(0, 9))
            cache.seqs[child].length += n
            family.append(child)
        seqs += family
    seqs = [s for s in seqs if cache.length(s) > 0]
    rng.shuffle(seqs)
    tables = cache._tables(seqs, max(len(cache.seqs[s].blocks) for s in seqs))
    lens = np.array([cache.length(s) for s in seqs])
    plan = upload_plan(*build_plan(tables, lens, bs, hkv, group), "cpu")
    rows_s, heads_s, seqs_s, first_s, ntok_s = (x.numpy() for x in plan.shared)
    rows_o, heads_o, seqs_o, first_o, ntok_o = (x.numpy() for x in plan.own)
    slots = plan.slots.numpy()
    assert plan.n_shared > 0  # these seeds give trees with shared blocks
    seen = np.zeros(len(seqs) * hkv * group, int)
    for i, rows in enumerate(rows_o):
        for r in rows[rows >= 0]:
            seen[r] += 1
            b, h = divmod(r // group, hkv)
            assert heads_o[i] == h and seqs_o[i] == b
            read, shared_tokens = [], 0
            if slots[r] >= 0:
                j, col = divmod(slots[r], plan.q_shared)
                assert rows_s[j, col] == r and heads_s[j] == h and first_s[j] == 0
                shared_tokens = ntok_s[j]
                assert shared_tokens % bs == 0  # only whole blocks are shared
                read += list(tables[seqs_s[j], : shared_tokens // bs])
            assert first_o[i] * bs == shared_tokens
            assert shared_tokens + ntok_o[i] == lens[b]
            read += list(tables[b, first_o[i]: first_o[i] + -(-ntok_o[i] // bs)])
            assert read == list(tables[b, : -(-lens[b] // bs)])
    assert (seen == 1).all()
