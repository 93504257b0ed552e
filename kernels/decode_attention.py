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
def _partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, rows_ptr, heads_ptr, seqs_ptr, first_ptr, ntok_ptr,
    out_ptr, lse_ptr, scale, table_width,
    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, MAXQ: tl.constexpr,
    TOK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
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
    table = tables_ptr + seq * table_width + first
    m = tl.full((MAXQ,), float("-inf"), tl.float32)
    l = tl.zeros((MAXQ,), tl.float32)
    acc = tl.zeros((MAXQ, D), tl.float32)
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
    # an empty item (n == 0, a padding slot) stores 0 with lse -inf; its rows are all -1 anyway
    seen = l > 0
    l = tl.where(seen, l, 1.0)
    tl.store(out_ptr + (item * MAXQ + r[:, None]) * D + d[None, :], acc / l[:, None])
    tl.store(lse_ptr + item * MAXQ + r, tl.where(seen, m + tl.log(l), float("-inf")))


# ---------------------------------------------------------------- the plan


def item_rows(hkv: int, group: int) -> tuple[int, int]:
    """Row slots of a shared-prefix item and of an own item (powers of two, >= 16 for tl.dot)."""
    per_item = max(1, MAX_SHARED_ROWS // group) * group
    return max(16, triton.next_power_of_2(per_item)), max(16, triton.next_power_of_2(group))


def shared_groups(tables: np.ndarray, lens: np.ndarray, bs: int) -> list[tuple[np.ndarray, int]]:
    """Sequences with a common run of full leading blocks: (members, shared block count)."""
    groups = []
    long_enough = np.flatnonzero(lens >= bs)
    firsts = tables[long_enough, 0]
    for first in np.unique(firsts):
        members = long_enough[firsts == first]
        if len(members) < 2:
            continue
        full = int(lens[members].min()) // bs
        same = (tables[members, :full] == tables[members[0], :full]).all(0)
        shared = full if same.all() else int(np.argmin(same))
        groups.append((members, shared))
    return groups


@dataclass
class DecodePlan:
    """Work items of one decode step in one int32 buffer: `shared` then `own` items, each
    (rows [I, Q], kv head [I], sequence [I], first block [I], tokens [I])."""

    buffer: torch.Tensor
    n_shared: int
    n_own: int
    q_shared: int
    q_own: int

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
        return self._fields(self._fields(0, self.n_shared, self.q_shared)[1], self.n_own,
                            self.q_own)[0]


def plan_size(n_shared: int, n_own: int, q_shared: int, q_own: int) -> int:
    return n_shared * (q_shared + 4) + n_own * (q_own + 4)


def capacity_items(batch: int, hkv: int, group: int) -> tuple[int, int]:
    """Most shared and own items `batch` sequences can need (a group has >= 2 members)."""
    per_chunk = max(1, MAX_SHARED_ROWS // group)
    chunks = batch // 2 if per_chunk >= 2 else batch
    return max(1, chunks) * hkv, batch * hkv


def build_plan(tables: np.ndarray, lens: np.ndarray, bs: int, hkv: int, group: int,
               cascade: bool = True, capacity: int | None = None) -> tuple[np.ndarray, tuple]:
    """The packed int32 plan and its (n_shared, n_own, q_shared, q_own).

    capacity: pad to the item counts of that many sequences (fixed shapes for CUDA graphs)."""
    B = len(lens)
    q_shared, q_own = item_rows(hkv, group)
    per_chunk = max(1, MAX_SHARED_ROWS // group)
    start = np.zeros(B, np.int64)
    shared = []  # (rows, head, seq, tokens)
    for members, n_blocks in (shared_groups(tables, lens, bs) if cascade else []):
        if n_blocks == 0:
            continue
        start[members] = n_blocks
        for c in range(0, len(members), per_chunk):
            chunk = members[c:c + per_chunk]
            for h in range(hkv):
                rows = ((chunk[:, None] * hkv + h) * group + np.arange(group)).ravel()
                shared.append((rows, h, chunk[0], n_blocks * bs))
    b, h = np.divmod(np.arange(B * hkv), hkv)
    own_tokens = lens[b] - start[b] * bs
    own_rows = np.full((B * hkv, q_own), -1, np.int64)
    own_rows[:, :group] = (b * hkv + h)[:, None] * group + np.arange(group)
    own_rows[own_tokens <= 0] = -1
    n_shared, n_own = len(shared), B * hkv
    if capacity is not None:
        cap_shared, cap_own = capacity_items(capacity, hkv, group)
        if n_shared > cap_shared or n_own > cap_own:
            raise ValueError(f"decode plan of {B} sequences exceeds the capacity of {capacity}")
        n_shared, n_own = cap_shared, cap_own
    out = np.zeros(plan_size(n_shared, n_own, q_shared, q_own), np.int32)
    rows_s = np.full((n_shared, q_shared), -1, np.int32)
    fields_s = np.zeros((4, n_shared), np.int32)
    for i, (rows, head, seq, ntok) in enumerate(shared):
        rows_s[i, : len(rows)] = rows
        fields_s[:, i] = (head, seq, 0, ntok)
    rows_o = np.full((n_own, q_own), -1, np.int32)
    rows_o[: B * hkv] = own_rows
    fields_o = np.zeros((4, n_own), np.int32)
    fields_o[:, : B * hkv] = (h, b, start[b], np.maximum(own_tokens, 0))
    parts = [rows_s.ravel(), fields_s.ravel(), rows_o.ravel(), fields_o.ravel()]
    np.concatenate(parts, out=out)
    return out, (n_shared, n_own, q_shared, q_own)


def upload_plan(packed: np.ndarray, dims: tuple, device, into: torch.Tensor | None = None
                ) -> DecodePlan:
    """Copy a packed plan to the device (into a preallocated buffer when given)."""
    host = torch.from_numpy(packed)
    if into is None:
        buf = host.to(device)
    else:
        buf = into[: host.numel()]
        buf.copy_(host, non_blocking=True)
    return DecodePlan(buf, *dims)


# ---------------------------------------------------------------- launch and merge


def decode_with_plan(q, k_pool, v_pool, block_tables, plan: DecodePlan, scale):
    """Decode attention [B, Hq, D] from a plan; no host synchronisation (CUDA-graph safe)."""
    B, Hq, D = q.shape
    _, bs, hkv, _ = k_pool.shape
    q = q.contiguous()
    outs, lses, rows_all = [], [], []
    for (rows, heads, seqs, first, ntok), maxq in ((plan.shared, plan.q_shared),
                                                    (plan.own, plan.q_own)):
        n = rows.shape[0]
        if n == 0:
            continue
        out = torch.empty(n, maxq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(n, maxq, dtype=torch.float32, device=q.device)
        _partial_attention_kernel[(n,)](
            q, k_pool, v_pool, block_tables, rows, heads, seqs, first, ntok, out, lse,
            float(scale), block_tables.shape[1],
            HKV=hkv, D=D, BS=bs, MAXQ=maxq, TOK=max(TOKENS_PER_ITER, bs), UPCAST=_UPCAST,
            IEEE=k_pool.dtype == torch.float32)
        outs.append(out.flatten(0, 1))
        lses.append(lse.flatten())
        rows_all.append(rows.flatten())
    merged = _merge(torch.cat(outs), torch.cat(lses), torch.cat(rows_all), B * Hq)
    return merged.view(B, Hq, D).to(q.dtype)


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


def _merge(out, lse, rows, n_rows):
    """Combine the partials of each query row by their softmax weights exp(lse - max lse).

    Fixed shapes: unused row slots (-1) go to a spare row n_rows that is dropped at the end."""
    idx = torch.where(rows >= 0, rows, n_rows).long()
    top = torch.full((n_rows + 1,), float("-inf"), device=out.device).scatter_reduce(
        0, idx, lse, "amax")
    w = torch.exp(lse - top[idx])
    num = torch.zeros(n_rows + 1, out.shape[-1], device=out.device).index_add_(
        0, idx, out * w[:, None])
    den = torch.zeros(n_rows + 1, device=out.device).index_add_(0, idx, w)
    return num[:n_rows] / den[:n_rows, None]
