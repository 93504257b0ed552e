"""Paged decode attention with shared-prefix (cascade) splitting, in Triton.

Branches forked from one sequence share the blocks of their common prefix. Instead of every
branch reading those blocks again, the launcher cuts the work into items: one item per group of
branches covers their shared prefix blocks with all of the group's query rows at once (K/V read
once, a [rows x block] tl.dot), and one item per branch covers its own remaining blocks. Each
item returns a normalised partial output and its log-sum-exp; partials of a row are merged by
their softmax weights, which is exact.

Layout as the CPU kernel: q [B, Hq, D]; k_pool, v_pool [num_blocks, block_size, Hkv, D];
block_tables [B, max_blocks] int32; context_lens [B] int32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the interpreter's tl.dot on bf16 is wrong; it computes in fp32 there instead
_UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, rows_ptr, heads_ptr, blocks_ptr, lens_ptr, out_ptr, lse_ptr, scale,
    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, MAXQ: tl.constexpr,
    MAXB: tl.constexpr, UPCAST: tl.constexpr,
):
    item = tl.program_id(0)
    r = tl.arange(0, MAXQ)
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    rows = tl.load(rows_ptr + item * MAXQ + r)
    live = rows >= 0
    head = tl.load(heads_ptr + item)
    n = tl.load(lens_ptr + item)
    q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full((MAXQ,), float("-inf"), tl.float32)
    l = tl.zeros((MAXQ,), tl.float32)
    acc = tl.zeros((MAXQ, D), tl.float32)
    for j in range(0, tl.cdiv(n, BS)):
        blk = tl.load(blocks_ptr + item * MAXB + j).to(tl.int64)
        valid = j * BS + t < n
        offs = ((blk * BS + t[:, None]) * HKV + head) * D + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        corr = tl.exp(m - m_new)
        l = l * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + (item * MAXQ + r[:, None]) * D + d[None, :], out)
    tl.store(lse_ptr + item * MAXQ + r, m + tl.log(l))


def _shared_groups(tables: list[list[int]], lens: list[int], bs: int):
    """Groups of sequences with a common run of full leading blocks: (members, shared blocks)."""
    by_first: dict[int, list[int]] = {}
    for b, n in enumerate(lens):
        if n >= bs:
            by_first.setdefault(tables[b][0], []).append(b)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        full = min(lens[b] // bs for b in members)
        shared = 0
        while shared < full and all(tables[b][shared] == tables[members[0]][shared]
                                    for b in members):
            shared += 1
        groups.append((members, shared))
    return groups


def _work_items(tables, lens, bs, hkv, group, max_rows):
    """(query rows, kv head, blocks, tokens) per item: shared prefixes, then each own rest."""
    items, start = [], [0] * len(lens)
    for members, shared in _shared_groups(tables, lens, bs):
        per_chunk = max(1, max_rows // group)
        for c in range(0, len(members), per_chunk):
            chunk = members[c:c + per_chunk]
            for h in range(hkv):
                rows = [(b * hkv + h) * group + g for b in chunk for g in range(group)]
                items.append((rows, h, tables[chunk[0]][:shared], shared * bs))
        for b in members:
            start[b] = shared
    for b, n in enumerate(lens):
        rest = tables[b][start[b]: -(-n // bs)]
        if n - start[b] * bs > 0:
            for h in range(hkv):
                items.append(([(b * hkv + h) * group + g for g in range(group)], h, rest,
                              n - start[b] * bs))
    return items


def paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale,
                           cascade: bool = True):
    """Decode attention [B, Hq, D] over the paged pools; cascade=False gives every sequence its
    own items (no prefix sharing), for comparison."""
    B, Hq, D = q.shape
    _, bs, hkv, _ = k_pool.shape
    group = Hq // hkv
    tables = block_tables.tolist()
    lens = context_lens.tolist()
    max_rows = 64
    items = (_work_items(tables, lens, bs, hkv, group, max_rows) if cascade
             else _work_items_flat(tables, lens, bs, hkv, group))
    maxq = max(16, triton.next_power_of_2(max(len(it[0]) for it in items)))
    maxb = max(1, max(len(it[2]) for it in items))
    dev = q.device
    rows = torch.full((len(items), maxq), -1, dtype=torch.int32)
    blocks = torch.zeros((len(items), maxb), dtype=torch.int32)
    for i, (r, _, blk, _) in enumerate(items):
        rows[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        blocks[i, : len(blk)] = torch.tensor(blk, dtype=torch.int32)
    heads = torch.tensor([it[1] for it in items], dtype=torch.int32)
    ntok = torch.tensor([it[3] for it in items], dtype=torch.int32)
    out = torch.empty(len(items), maxq, D, dtype=torch.float32, device=dev)
    lse = torch.empty(len(items), maxq, dtype=torch.float32, device=dev)
    rows, blocks, heads, ntok = (x.to(dev) for x in (rows, blocks, heads, ntok))
    _partial_attention_kernel[(len(items),)](
        q.contiguous(), k_pool, v_pool, rows, heads, blocks, ntok, out, lse, float(scale),
        HKV=hkv, D=D, BS=bs, MAXQ=maxq, MAXB=maxb, UPCAST=_UPCAST)
    return _merge(out, lse, rows, B * Hq).view(B, Hq, D).to(q.dtype)


def _work_items_flat(tables, lens, bs, hkv, group):
    return [([(b * hkv + h) * group + g for g in range(group)], h, tables[b][: -(-n // bs)], n)
            for b, n in enumerate(lens) for h in range(hkv)]


def _merge(out, lse, rows, n_rows):
    """Combine the partials of each query row by their softmax weights exp(lse - logsumexp)."""
    live = rows.flatten() >= 0
    idx = rows.flatten()[live].long()
    o, s = out.flatten(0, 1)[live], lse.flatten()[live]
    top = torch.full((n_rows,), float("-inf"), device=out.device).scatter_reduce(
        0, idx, s, "amax")
    w = torch.exp(s - top[idx])
    num = torch.zeros(n_rows, out.shape[-1], device=out.device).index_add_(0, idx, o * w[:, None])
    den = torch.zeros(n_rows, device=out.device).index_add_(0, idx, w)
    return num / den[:, None]
