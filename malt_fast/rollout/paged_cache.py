"""Paged KV cache: a block pool for every layer of one model, per-sequence block tables, and the
prefix index over the blocks.

The parts: `BlockPool` (block_pool.py) hands out block ids and counts their references;
`PrefixIndex` (prefix_index.py) keeps blocks after their sequences end, keyed by (weights,
tokens); this class holds the k/v tensors the ids index, each sequence's block table, and the
layout of one forward's reads and writes.

Sequences that share a prefix share its blocks. `fork` copies nothing: every block of the parent
gains a reference, and a shared block that is only partly filled is copied the first time a
branch writes into it (copy-on-write), so only that one block is ever duplicated per branch.
`adopt` starts a sequence from the longest cached prefix of its context; `remember` indexes a
sequence's blocks. When an allocation finds the free list short, the index gives back blocks
that only it holds; a block a sequence holds is never evicted.

The model talks to the cache through `attend(layer_idx, q, k, v)`; the engine first calls
`begin(seq_ids, n_new)` to say which sequences the forward extends and by how many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from malt_fast.model.llama import LlamaConfig, attention
from malt_fast.rollout.block_pool import BlockPool, CacheFull
from malt_fast.rollout.prefix_index import PrefixIndex


@dataclass
class Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


def reference_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale):
    """Plain torch paged decode attention (gathers each sequence's blocks); q [B, Hq, D]."""
    B, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(context_lens[b])
        blocks = block_tables[b, : (n + bs - 1) // bs].long()
        k = k_pool[blocks].reshape(-1, Hkv, D)[:n].float()
        v = v_pool[blocks].reshape(-1, Hkv, D)[:n].float()
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def cpp_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale):
    import malt_fast._C  # noqa: F401  (registers torch.ops.malt_fast.*)

    return torch.ops.malt_fast.paged_decode_attention(q, k_pool, v_pool, block_tables,
                                                      context_lens, scale)


def triton_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale, plan=None):
    from malt_fast.kernels.decode_attention import decode_with_plan, paged_decode_attention

    if plan is None:
        return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale)
    return decode_with_plan(q, k_pool, v_pool, block_tables, plan, scale)


DECODE_BACKENDS = {"torch": reference_decode_attention, "cpp": cpp_decode_attention,
                   "triton": triton_decode_attention}


class PagedKVCache:
    """Keys and values of every layer of one model in the pool's blocks, and the block table of
    each sequence in it.

    `peak_used` is the most blocks sequences held at once (cached prefixes nobody holds are not
    counted: the pool fills up with them and gives them back on demand).

    The tensors have one block more than `num_blocks`: a scratch block that no sequence owns,
    where the padding rows of a fixed-shape (CUDA graph) decode step write and read.
    """

    def __init__(self, cfg: LlamaConfig, num_blocks: int, block_size: int = 16,
                 dtype=torch.float32, device="cpu", decode_backend: str = "auto",
                 max_seq_len: int | None = None):
        if decode_backend == "auto":
            decode_backend = "triton" if torch.device(device).type == "cuda" else "cpp"
        if decode_backend not in DECODE_BACKENDS:
            raise ValueError(f"decode_backend {decode_backend!r}: one of {sorted(DECODE_BACKENDS)}")
        self.backend = decode_backend
        self.decode_attention = DECODE_BACKENDS[decode_backend]
        self.block_size, self.num_blocks = block_size, num_blocks
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = cfg.num_key_value_heads
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scale = cfg.head_dim ** -0.5
        self.scratch = num_blocks
        # block-table width of fixed-shape decode steps: the longest sequence the model takes
        self.static_width = self.blocks_for(min(max_seq_len or cfg.max_position_embeddings,
                                                num_blocks * block_size))
        shape = (cfg.num_hidden_layers, num_blocks + 1, block_size, cfg.num_key_value_heads,
                 cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pool = BlockPool(num_blocks)
        self.index = PrefixIndex(self.pool, block_size)
        self.seqs: dict[int, Sequence] = {}
        self._next_id = 0
        self._step = None
        self._static: dict[int, dict] = {}

    # ------------------------------------------------------------ bookkeeping

    @property
    def used_blocks(self) -> int:
        return self.pool.used

    @property
    def idle_blocks(self) -> int:
        """Blocks only the prefix index holds (evicted when an allocation needs them)."""
        return self.pool.idle

    @property
    def held_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.pool.held

    @property
    def peak_used(self) -> int:
        return self.pool.peak_held

    @property
    def evicted(self) -> int:
        return self.index.evicted

    def available(self) -> int:
        """Blocks an allocation can get: the free ones plus the idle ones."""
        return self.pool.available()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def new_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self.seqs[sid] = Sequence()
        return sid

    def length(self, sid: int) -> int:
        return self.seqs[sid].length

    def fork(self, sid: int, n: int) -> list[int]:
        """n new sequences that share all of `sid`'s blocks (no copy until one of them writes)."""
        parent = self.seqs[sid]
        children = []
        for _ in range(n):
            child = self.new_sequence()
            self.seqs[child] = Sequence(list(parent.blocks), parent.length)
            self.pool.share(parent.blocks)
            children.append(child)
        return children

    def release(self, sid: int) -> None:
        for b in self.seqs.pop(sid).blocks:
            self.pool.decref(b)

    def truncate(self, sid: int, length: int) -> None:
        """Forget tokens from `length` on; blocks wholly past it are released."""
        seq = self.seqs[sid]
        if not 0 <= length <= seq.length:
            raise ValueError(f"truncate to {length}: sequence has {seq.length} tokens")
        keep = self.blocks_for(length)
        for b in seq.blocks[keep:]:
            self.pool.decref(b)
        del seq.blocks[keep:]
        seq.length = length

    def blocks_needed(self, sid: int, n_new: int) -> int:
        """Fresh blocks `reserve(sid, n_new)` would take: new blocks plus a copied shared tail."""
        seq = self.seqs[sid]
        need = self.blocks_for(seq.length + n_new) - len(seq.blocks)
        if seq.length % self.block_size and self.pool.refcount[seq.blocks[-1]] > 1 and n_new:
            need += 1
        return need

    def reserve(self, sid: int, n_new: int) -> None:
        """Make room to write n_new more tokens, copying a shared partial tail block first."""
        seq, pool = self.seqs[sid], self.pool
        if seq.length % self.block_size and seq.length + n_new <= len(seq.blocks) * \
                self.block_size and pool.refcount[seq.blocks[-1]] == 1:
            return  # most decode steps: room left in an unshared last block
        need = self.blocks_needed(sid, n_new)
        if need > len(pool.free):
            if need > pool.available():
                raise CacheFull(f"KV cache full: writing {n_new} tokens needs "
                                f"{need} free blocks, {pool.available()} of "
                                f"{self.num_blocks} are free; build the engine with more cache "
                                f"blocks")
            self.index.evict(need - len(pool.free))
        if n_new and seq.length % self.block_size:
            old = seq.blocks[-1]
            new = pool.writable(old)
            if new != old:
                self.k[:, new] = self.k[:, old]
                self.v[:, new] = self.v[:, old]
                seq.blocks[-1] = new
        while len(seq.blocks) < self.blocks_for(seq.length + n_new):
            seq.blocks.append(pool.alloc())

    # ------------------------------------------------------------ prefix index

    def adopt(self, tokens, weights=None, limit: int | None = None) -> tuple[int, int]:
        """A new sequence holding the longest cached prefix of `tokens[:limit]`:
        (sequence id, its length). Its next write copies a partly matched last block."""
        path, n = self.index.match(tokens, weights, limit)
        sid = self.new_sequence()
        self.seqs[sid] = Sequence([node.block for node in path], n)
        self.pool.share(self.seqs[sid].blocks)
        self.index.touch(path)
        return sid, n

    def remember(self, sid: int, tokens, weights=None) -> None:
        """Index sequence `sid`'s blocks; `tokens` are its contents (at least its length)."""
        seq = self.seqs[sid]
        if len(tokens) < seq.length:
            raise ValueError(f"remember: {len(tokens)} tokens for a sequence of {seq.length}")
        self.index.insert(seq.blocks, tokens[:seq.length], weights)

    # ------------------------------------------------------------ one forward

    def begin(self, seq_ids: list[int], n_new: list[int]) -> torch.Tensor:
        """Prepare a forward that appends n_new[i] tokens to seq_ids[i]; returns positions [B, T].

        Rows are right-padded to max(n_new); padded tokens are neither written nor attended.
        """
        for sid, n in zip(seq_ids, n_new):
            self.reserve(sid, n)
        T = max(n_new)
        starts = np.array([self.seqs[s].length for s in seq_ids], np.int64)
        n_new_a = np.array(n_new, np.int64)
        tables = self._tables(seq_ids, max(len(self.seqs[s].blocks) for s in seq_ids))
        positions = starts[:, None] + np.arange(T)[None, :]
        real = np.arange(T)[None, :] < n_new_a[:, None]
        bs = self.block_size
        block_of = np.take_along_axis(tables, np.minimum(positions // bs, tables.shape[1] - 1), 1)
        slots = (block_of * bs + positions % bs)[real]
        ctx = starts + n_new_a
        self._step = dict(
            T=T, positions=self._to_device(positions), real=self._to_device(real, torch.bool),
            slots=self._to_device(slots), tables=self._to_device(tables),
            ctx_lens=self._to_device(ctx), tables32=self._to_device(tables, torch.int32),
            ctx_lens32=self._to_device(ctx, torch.int32))
        if T == 1 and self.backend == "triton":
            from malt_fast.kernels.decode_attention import build_plan, upload_plan

            packed, dims = build_plan(tables, ctx, bs, self.n_kv, self.group)
            self._step["plan"] = upload_plan(packed, dims, self.k.device)
        for sid, n in zip(seq_ids, n_new):
            self.seqs[sid].length += n
        return self._step["positions"]

    def begin_packed(self, seq_ids: list[int], n_new: list[int]) -> torch.Tensor:
        """Prepare a prefill forward whose rows are packed end to end into one row of
        sum(n_new) tokens, without padding; returns positions [1, sum(n_new)]. `attend` then
        runs each sequence's attention over its own context (a padded batch computes every row
        to the longest row's length and context: with cached prefixes one row may bring 300
        new tokens and the next 1)."""
        for sid, n in zip(seq_ids, n_new):
            self.reserve(sid, n)
        bs, dev = self.block_size, self.k.device
        positions, slots, context, segments, masks = [], [], [], [], []
        q_off = kv_off = 0
        for sid, n in zip(seq_ids, n_new):
            seq = self.seqs[sid]
            start, end = seq.length, seq.length + n
            p = np.arange(end)
            where = np.asarray(seq.blocks, np.int64)[p // bs] * bs + p % bs
            positions.append(p[start:])
            slots.append(where[start:])
            context.append(where)
            segments.append((q_off, n, kv_off, end))
            # query i (position start + i) sees keys 0 .. start + i
            masks.append(torch.ones(n, end, dtype=torch.bool, device=dev).tril(start)[None, None])
            q_off, kv_off = q_off + n, kv_off + end
            seq.length = end
        self._step = dict(T=q_off, packed=segments, masks=masks,
                          slots=self._to_device(np.concatenate(slots)),
                          context=self._to_device(np.concatenate(context)))
        return self._to_device(np.concatenate(positions))[None]

    def fits_static(self, seq_ids: list[int]) -> bool:
        """Whether one more token of each sequence fits the fixed decode block tables."""
        return self.blocks_for(max(self.seqs[s].length for s in seq_ids) + 1) <= self.static_width

    def begin_static_decode(self, seq_ids: list[int], bucket: int) -> dict:
        """`begin(seq_ids, [1] * B)` into fixed buffers of `bucket` >= B rows (Triton backend).

        Rows past B are padding: position 0 of the scratch block. Every call for one bucket
        returns the same tensors, refilled, which is what a captured CUDA graph reads. The host
        side is staged in two alternating pinned buffers (on CUDA), so filling the next step's
        inputs never waits for the step in flight."""
        from malt_fast.kernels.decode_attention import build_plan

        B, W, bs = len(seq_ids), self.static_width, self.block_size
        if B > bucket:
            raise ValueError(f"{B} sequences in a decode step of {bucket} rows")
        for sid in seq_ids:
            self.reserve(sid, 1)
        st = self._static.get(bucket) or self._new_static(bucket)
        stage = st["stages"][st["turn"]]
        st["turn"] ^= 1
        if stage["copied"] is not None:
            stage["copied"].synchronize()
        i64, i32 = stage["i64"].numpy(), stage["i32"].numpy()
        starts, slots = i64[:bucket], i64[bucket:]
        tables = i32[: bucket * W].reshape(bucket, W)
        lens = i32[bucket * W: bucket * W + bucket]
        tables.fill(self.scratch)
        self._tables(seq_ids, W, out=tables)
        starts.fill(0)
        for i, sid in enumerate(seq_ids):
            seq = self.seqs[sid]
            starts[i] = seq.length
            seq.length += 1
        np.add(starts, 1, out=lens, casting="unsafe")
        slots[:] = tables[np.arange(bucket), starts // bs] * bs + starts % bs
        build_plan(tables, lens, bs, self.n_kv, self.group, capacity=bucket,
                   out=i32[bucket * W + bucket:])
        st["i64"].copy_(stage["i64"], non_blocking=True)
        st["i32"].copy_(stage["i32"], non_blocking=True)
        if stage["copied"] is not None:
            stage["copied"].record()
        self._step = st
        return st

    def _new_static(self, bucket: int) -> dict:
        """Device buffers of a bucket's fixed-shape decode step and their two host stagings."""
        from malt_fast.kernels.decode_attention import DecodePlan, capacity_dims, plan_size

        W, dev = self.static_width, self.k.device
        dims = capacity_dims(bucket, self.n_kv, self.group)
        n32 = bucket * W + bucket + plan_size(*dims)
        i64 = torch.zeros(2 * bucket, dtype=torch.int64, device=dev)
        i32 = torch.zeros(n32, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"

        def host(n, dtype):
            t = torch.zeros(n, dtype=dtype)
            return t.pin_memory() if pin else t

        stages = [dict(i64=host(2 * bucket, torch.int64), i32=host(n32, torch.int32),
                       copied=torch.cuda.Event() if pin else None) for _ in range(2)]
        st = self._static[bucket] = dict(
            T=1, i64=i64, i32=i32, positions=i64[:bucket].view(bucket, 1),
            slots=i64[bucket:], tables32=i32[: bucket * W].view(bucket, W),
            ctx_lens32=i32[bucket * W: bucket * W + bucket],
            plan=DecodePlan(i32[bucket * W + bucket:], *dims), stages=stages, turn=0)
        return st

    def _tables(self, seq_ids: list[int], width: int, out: np.ndarray | None = None) -> np.ndarray:
        """Block tables [B, width] (into the first B rows of `out` when given); entries past a
        sequence's blocks are left as they are (0 in a new array) and never read."""
        tables = np.zeros((len(seq_ids), width), np.int64) if out is None else out
        for i, s in enumerate(seq_ids):
            blocks = self.seqs[s].blocks
            tables[i, : len(blocks)] = blocks
        return tables

    def _to_device(self, a: np.ndarray, dtype=torch.int64) -> torch.Tensor:
        return torch.from_numpy(a).to(device=self.k.device, dtype=dtype)

    def attend(self, layer_idx: int, q, k, v):
        """Write this forward's k/v [B, Hkv, T, D] into the blocks, then attend over the context."""
        st = self._step
        B, Hkv, T, D = k.shape
        flat = self.k.shape[1] * self.block_size
        k_flat = self.k[layer_idx].view(flat, Hkv, D)
        v_flat = self.v[layer_idx].view(flat, Hkv, D)
        if "packed" in st:  # one row of every sequence's new tokens end to end
            k_flat.index_copy_(0, st["slots"], k[0].transpose(0, 1).to(k_flat.dtype))
            v_flat.index_copy_(0, st["slots"], v[0].transpose(0, 1).to(v_flat.dtype))
            return self._packed_attention(k_flat, v_flat, q, st)
        if T == 1:  # every row of a decode step is a real token (fixed shapes, no masking)
            k_new, v_new = k[:, :, 0], v[:, :, 0]
        else:
            k_new, v_new = k.transpose(1, 2)[st["real"]], v.transpose(1, 2)[st["real"]]
        k_flat.index_copy_(0, st["slots"], k_new.to(k_flat.dtype))
        v_flat.index_copy_(0, st["slots"], v_new.to(v_flat.dtype))
        if T == 1:
            plan = {"plan": st["plan"]} if "plan" in st else {}
            out = self.decode_attention(q[:, :, 0].to(self.k.dtype), self.k[layer_idx],
                                        self.v[layer_idx], st["tables32"], st["ctx_lens32"],
                                        self.scale, **plan)
            return out.to(q.dtype).unsqueeze(2)
        return self._prefill_attention(layer_idx, q, st)

    @staticmethod
    def _packed_attention(k_flat, v_flat, q, st):
        """Each packed sequence's new queries against its own context, gathered once for all."""
        keys = k_flat.index_select(0, st["context"]).to(q.dtype).transpose(0, 1)[None]
        vals = v_flat.index_select(0, st["context"]).to(q.dtype).transpose(0, 1)[None]
        return torch.cat([attention(q[:, :, qo:qo + n], keys[:, :, ko:ko + end],
                                    vals[:, :, ko:ko + end], mask)
                          for (qo, n, ko, end), mask in zip(st["packed"], st["masks"])], dim=2)

    def _prefill_attention(self, layer_idx, q, st):
        """SDPA over each row's gathered context: prefill is rare and compute-bound, so a copy
        of the context is cheap next to the matmuls that follow."""
        tables = st["tables"]
        B, nb = tables.shape
        _, _, Hkv, D = self.k.shape[1:]
        k = self.k[layer_idx][tables].view(B, nb * self.block_size, Hkv, D).transpose(1, 2)
        v = self.v[layer_idx][tables].view(B, nb * self.block_size, Hkv, D).transpose(1, 2)
        key_pos = torch.arange(nb * self.block_size, device=q.device)
        mask = ((key_pos[None, None, :] <= st["positions"][:, :, None])
                & (key_pos[None, None, :] < st["ctx_lens"][:, None, None]))
        return attention(q, k.to(q.dtype), v.to(q.dtype), mask[:, None])
