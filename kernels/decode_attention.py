"""Paged decode attention with shared-prefix (cascade) splitting, in Triton.

Branches forked from one sequence share the blocks of their common prefix. Instead of every
branch reading those blocks again, the work is cut into items: one item per group of branches
covers their shared prefix blocks with all of the group's query rows at once (K/V read once, a
[rows x tokens] tl.dot), and one item per branch and kv head covers its own remaining blocks.
Each item returns a normalised partial output and its log-sum-exp; partials of a row are merged
by their softmax weights, which is exact.

The items form a `DecodePlan`, built on the host once per decode step (it depends on the block
tables, not on the layer) and read by every layer's launch. Given a `capacity`, a plan's shapes
depend only on that capacity, so a decode step can be captured in a CUDA graph and replayed with
the next step's plan copied into the same buffers.

Layout as the CPU kernel: q [B, Hq, D]; k_pool, v_pool [num_blocks, block_size, Hkv, D];
block_tables [B, width] int32; context_lens [B] int32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

# the interpreter's tl.dot on bf16 is wrong; it computes in fp32 there instead
_UPCAST = os.environ.get("TRITON_INTERPRET") == "1"
# tokens per loop iteration: several blocks per load keeps more bytes in flight per program
TOKENS_PER_ITER = 64
# query rows of one shared-prefix item (branches x heads of a kv head's group)
MAX_SHARED_ROWS = 64


@triton.jit
def _attention_items_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, rows_ptr, heads_ptr, seqs_ptr, first_ptr, ntok_ptr,
    part_out_ptr, part_lse_ptr, slot_ptr, out_ptr, scale, table_width,
    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, MAXQ: tl.constexpr,
    TOK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    SHARED_IN: tl.constexpr, FINAL: tl.constexpr,
):
    """One item: online softmax over `ntok` tokens of a sequence's blocks from `first` on.

    Shared pass (FINAL=0): store each row's normalised partial and log-sum-exp at the item's
    slots of part_out/part_lse. Own pass (FINAL=1): start each row from its shared partial
    (slot_ptr maps a query row to it, -1 for none) when SHARED_IN, continue over the row's own
    tokens, and store the finished row in out (q's dtype); no separate merge step."""
    item = tl.program_id(0)
    r = tl.arange(0, MAXQ)
    d = tl.arange(0, D)
    t = tl.arange(0, TOK)
    rows = tl.load(rows_ptr + item * MAXQ + r)
    live = rows >= 0
    head = tl.load(heads_ptr + item)
    seq = tl.load(seqs_ptr + item).to(tl.int64)
    first = tl.load(first_ptr + item)
    n = tl.load(ntok_ptr + item)
    q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if SHARED_IN:
        slot = tl.load(slot_ptr + rows, mask=live, other=-1)
        has = slot >= 0
        m = tl.load(part_lse_ptr + slot, mask=has, other=float("-inf"))
        l = tl.where(has, 1.0, 0.0)
        acc = tl.load(part_out_ptr + slot[:, None] * D + d[None, :], mask=has[:, None],
                      other=0.0)
    else:
        m = tl.full((MAXQ,), float("-inf"), tl.float32)
        l = tl.zeros((MAXQ,), tl.float32)
        acc = tl.zeros((MAXQ, D), tl.float32)
    table = tables_ptr + seq * table_width + first
    for j in range(0, tl.cdiv(n, TOK)):
        pos = j * TOK + t
        valid = pos < n
        blk = tl.load(table + pos // BS, mask=valid, other=0).to(tl.int64)
        offs = ((blk * BS + pos % BS)[:, None] * HKV + head) * D + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:  # fp32 caches: full fp32 products, not Triton's default tf32
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        corr = tl.exp(m - m_new)
        l = l * corr + tl.sum(p, 1)
        if IEEE:
            acc = acc * corr[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    # an empty item (n == 0, a padding slot) has l == 0: it stores 0 with lse -inf
    seen = l > 0
    l = tl.where(seen, l, 1.0)
    if FINAL:
        tl.store(out_ptr + rows[:, None] * D + d[None, :],
                 (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=live[:, None])
    else:
        tl.store(part_out_ptr + (item * MAXQ + r[:, None]) * D + d[None, :], acc / l[:, None])
        tl.store(part_lse_ptr + item * MAXQ + r, tl.where(seen, m + tl.log(l), float("-inf")))


# ---------------------------------------------------------------- the plan


def branches_per_shared_item(group: int) -> int:
    return max(1, MAX_SHARED_ROWS // group)


def item_rows(hkv: int, group: int) -> tuple[int, int]:
    """Row slots of a shared-prefix item and of an own item (powers of two, >= 16 for tl.dot)."""
    per_item = branches_per_shared_item(group) * group
    return max(16, triton.next_power_of_2(per_item)), max(16, triton.next_power_of_2(group))


def shared_prefixes(tables: np.ndarray, lens: np.ndarray, bs: int):
    """Sequences that share full leading blocks with others of their group (same first block).

    Returns (members, group of each member, shared block count of each member), members sorted
    by group; a group's count is the run of leading blocks all of its members have in common."""
    cand = np.flatnonzero(lens >= bs)
    if len(cand) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    cand = cand[np.argsort(tables[cand, 0], kind="stable")]
    _, first_of, counts = np.unique(tables[cand, 0], return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(counts)), counts)
    leader = cand[first_of][group]
    width = int((lens[cand] // bs).max())  # blocks past every full block cannot be shared
    same = tables[cand, :width] == tables[leader, :width]
    run = np.where(same.all(1), width, same.argmin(1))
    shared = np.minimum(np.minimum.reduceat(run, first_of),
                        np.minimum.reduceat(lens[cand] // bs, first_of))
    shared[counts < 2] = 0
    keep = shared[group] > 0
    return cand[keep], group[keep], shared[group[keep]]


@dataclass
class DecodePlan:
    """Work items of one decode step in one int32 buffer: `shared` then `own` items, each
    (rows [I, Q], kv head [I], sequence [I], first block [I], tokens [I]), then `slots`: per
    query row, the flat index of its partial in the shared pass's output (-1 for none)."""

    buffer: torch.Tensor
    n_shared: int
    n_own: int
    q_shared: int
    q_own: int
    n_rows: int

    def _fields(self, offset, n, q):
        b = self.buffer
        rows = b[offset: offset + n * q].view(n, q)
        offset += n * q
        rest = [b[offset + i * n: offset + (i + 1) * n] for i in range(4)]
        return (rows, *rest), offset + 4 * n

    @property
    def shared(self):
        return self._fields(0, self.n_shared, self.q_shared)[0]

    @property
    def own(self):
        return self._fields(self._own_offset, self.n_own, self.q_own)[0]

    @property
    def slots(self):
        start = self._own_offset + self.n_own * (self.q_own + 4)
        return self.buffer[start: start + self.n_rows]

    @property
    def _own_offset(self):
        return self.n_shared * (self.q_shared + 4)


def plan_size(n_shared: int, n_own: int, q_shared: int, q_own: int, n_rows: int) -> int:
    return n_shared * (q_shared + 4) + n_own * (q_own + 4) + n_rows


def capacity_items(batch: int, hkv: int, group: int) -> tuple[int, int]:
    """Most shared and own items `batch` sequences can need (a group has >= 2 members)."""
    chunks = batch // 2 if branches_per_shared_item(group) >= 2 else batch
    return max(1, chunks) * hkv, batch * hkv


def capacity_dims(capacity: int, hkv: int, group: int) -> tuple:
    """A plan's (n_shared, n_own, q_shared, q_own, n_rows) padded to `capacity` sequences."""
    n_shared, n_own = capacity_items(capacity, hkv, group)
    return (n_shared, n_own, *item_rows(hkv, group), n_own * group)


def build_plan(tables: np.ndarray, lens: np.ndarray, bs: int, hkv: int, group: int,
               cascade: bool = True, capacity: int | None = None,
               out: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
    """The packed int32 plan and its (n_shared, n_own, q_shared, q_own, n_rows).

    Every query row belongs to exactly one own item (which writes its output, even when the
    row has no tokens of its own) and to at most one shared item. capacity: pad to the item
    counts of that many sequences (fixed shapes for CUDA graphs). out: an int32 array to pack
    into (a staging buffer) instead of a new one."""
    B = len(lens)
    q_shared, q_own = item_rows(hkv, group)
    per_chunk = branches_per_shared_item(group)
    start = np.zeros(B, np.int64)
    members, gid, n_blocks = (shared_prefixes(tables, lens, bs) if cascade
                              else (np.empty(0, np.int64),) * 3)
    start[members] = n_blocks
    # members of a group go into chunks of per_chunk; one shared item per (chunk, kv head)
    rank = np.arange(len(members)) - np.searchsorted(gid, gid)
    chunk = rank // per_chunk
    new_chunk = np.r_[True, (gid[1:] != gid[:-1]) | (chunk[1:] != chunk[:-1])] \
        if len(members) else np.empty(0, bool)
    chunk_id = np.cumsum(new_chunk) - 1
    n_items = int(new_chunk.sum()) * hkv
    b, h = np.divmod(np.arange(B * hkv), hkv)
    own_rows = np.full((B * hkv, q_own), -1, np.int64)
    own_rows[:, :group] = (b * hkv + h)[:, None] * group + np.arange(group)
    n_shared, n_own, n_rows = n_items, B * hkv, B * hkv * group
    if capacity is not None:
        cap = capacity_dims(capacity, hkv, group)
        if n_shared > cap[0] or n_own > cap[1]:
            raise ValueError(f"decode plan of {B} sequences exceeds the capacity of {capacity}")
        n_shared, n_own, n_rows = cap[0], cap[1], cap[4]
    rows_s = np.full((n_shared, q_shared), -1, np.int32)
    fields_s = np.zeros((4, n_shared), np.int32)
    slots = np.full(n_rows, -1, np.int32)
    heads, gs = np.arange(hkv)[None, :, None], np.arange(group)[None, None, :]
    item = chunk_id[:, None, None] * hkv + heads  # [members, hkv, 1]
    col = (rank % per_chunk)[:, None, None] * group + gs  # [members, 1, group]
    row = (members[:, None, None] * hkv + heads) * group + gs  # [members, hkv, group]
    item, col = np.broadcast_to(item, row.shape), np.broadcast_to(col, row.shape)
    rows_s[item, col] = row
    slots[row] = item * q_shared + col
    chunk_first = np.flatnonzero(new_chunk)
    fields_s[:, :n_items] = (np.tile(np.arange(hkv), len(chunk_first)),
                             np.repeat(members[chunk_first], hkv), np.zeros(n_items),
                             np.repeat(n_blocks[chunk_first] * bs, hkv))
    rows_o = np.full((n_own, q_own), -1, np.int32)
    rows_o[: B * hkv] = own_rows
    fields_o = np.zeros((4, n_own), np.int32)
    fields_o[:, : B * hkv] = (h, b, start[b], lens[b] - start[b] * bs)
    dims = (n_shared, n_own, q_shared, q_own, n_rows)
    if out is None:
        out = np.empty(plan_size(*dims), np.int32)
    np.concatenate([rows_s.ravel(), fields_s.ravel(), rows_o.ravel(), fields_o.ravel(), slots],
                   out=out)
    return out, dims


def upload_plan(packed: np.ndarray, dims: tuple, device) -> DecodePlan:
    """Copy a packed plan to the device."""
    return DecodePlan(torch.from_numpy(packed).to(device), *dims)


# ---------------------------------------------------------------- launch


def decode_with_plan(q, k_pool, v_pool, block_tables, plan: DecodePlan, scale):
    """Decode attention [B, Hq, D] from a plan: the shared pass, then the own pass that finishes
    every row. No host synchronisation (CUDA-graph safe)."""
    B, Hq, D = q.shape
    _, bs, hkv, _ = k_pool.shape
    if plan.n_rows != B * Hq:
        raise ValueError(f"decode plan covers {plan.n_rows} query rows, q has {B * Hq}")
    q = q.contiguous()
    out = torch.empty_like(q)
    n_part = max(1, plan.n_shared * plan.q_shared)
    part_out = torch.empty(n_part, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(n_part, dtype=torch.float32, device=q.device)
    common = dict(HKV=hkv, D=D, BS=bs, TOK=max(TOKENS_PER_ITER, bs), UPCAST=_UPCAST,
                  IEEE=k_pool.dtype == torch.float32)
    passes = [(plan.shared, plan.q_shared, False)] if plan.n_shared else []
    passes.append((plan.own, plan.q_own, True))
    for (rows, heads, seqs, first, ntok), maxq, final in passes:
        _attention_items_kernel[(rows.shape[0],)](
            q, k_pool, v_pool, block_tables, rows, heads, seqs, first, ntok, part_out,
            part_lse, plan.slots, out, float(scale), block_tables.shape[1],
            MAXQ=maxq, SHARED_IN=final and plan.n_shared > 0, FINAL=final, **common)
    return out


def paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale,
                           cascade: bool = True):
    """Decode attention [B, Hq, D] over the paged pools; builds the plan from the tables (one
    host sync). cascade=False gives every sequence its own items (no prefix sharing)."""
    B, Hq, D = q.shape
    _, bs, hkv, _ = k_pool.shape
    packed, dims = build_plan(block_tables.cpu().numpy(), context_lens.cpu().numpy(), bs, hkv,
                              Hq // hkv, cascade)
    plan = upload_plan(packed, dims, q.device)
    return decode_with_plan(q, k_pool, v_pool, block_tables.to(torch.int32), plan, scale)
