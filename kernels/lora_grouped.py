"""Several LoRA adapters in one batch: each batch row gets the low-rank update of its own adapter.

The idea of S-LoRA and Punica: the base projection stays one GEMM over the whole batch (its
weight is shared, so splitting the batch by adapter would only make the big GEMM smaller and
slower), and only the small LoRA update is grouped by adapter. Two kernels per projection:

    shrink:  v[m]   = x[m] @ A[k]^T     [M, R]  fp32
    expand:  out[m] += v[m] @ B[k]^T    [M, N]  (B holds the scaling already)

for token row m of x [B, T, K] flattened to [M = B*T, K], with k = ids[m // T] the adapter of
its batch row (-1: none, the row is left alone). The adapters are stacked and zero-padded to one
rank R (a power of two >= 16, tl.dot's smallest tile): A [n, R, K], B [n, N, R]; padded ranks
add exact zeros, so adapters of different (odd) ranks share one launch.

A tile of rows can hold several adapters (a decode batch mixes roles row by row). The tile does
one tl.dot per adapter present in it, loading only that adapter's rows (the others read as 0),
so every product is a plain dense tile and each row of x is read once; a tile of one adapter
(most of a prefill, whose rows are long runs of one sequence) does a single product.

ids is read on the device from a buffer the caller owns: a captured CUDA graph replays with
whatever ids were written there last, and nothing here waits on the host. Products are in fp32
(ieee, not tf32), the adapters' dtype; the update is rounded to out's dtype before it is added,
as `LoRALinear.forward` does. Inference only: no backward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the interpreter runs each program instance in Python (~0.4 ms): wide tiles, few programs
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def rank_tile(max_rank: int) -> int:
    """The padded rank R of the stacked adapters."""
    return max(16, triton.next_power_of_2(max(1, max_rank)))


@triton.jit(do_not_specialize=["M", "T", "stride_x"])
def _shrink_kernel(x_ptr, a_ptr, ids_ptr, v_ptr, M, K, T, stride_x,
                   N_ADAPTERS: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                   BK: tl.constexpr):
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    live = m < M
    ids = tl.load(ids_ptr + m // T, mask=live, other=-1)
    r = tl.arange(0, R)
    kk = tl.arange(0, BK)
    rows = m.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BM, R), tl.float32)
    for j in tl.static_range(N_ADAPTERS):
        mine = ids == j
        if tl.sum(mine.to(tl.int32), 0) > 0:
            a_rows = a_ptr + (j * R + r[:, None]).to(tl.int64) * K
            for k0 in range(0, K, BK):
                cols = k0 + kk
                col_ok = cols[None, :] < K
                x = tl.load(x_ptr + rows + cols[None, :], mask=mine[:, None] & col_ok,
                            other=0.0).to(tl.float32)
                a = tl.load(a_rows + cols[None, :], mask=col_ok, other=0.0).to(tl.float32)
                acc += tl.dot(x, tl.trans(a), input_precision="ieee")
    tl.store(v_ptr + m.to(tl.int64)[:, None] * R + r[None, :], acc, mask=live[:, None])


@triton.jit(do_not_specialize=["M", "T"])
def _expand_kernel(v_ptr, b_ptr, ids_ptr, out_ptr, M, N, T,
                   N_ADAPTERS: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr):
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    live = m < M
    n_ok = n < N
    ids = tl.load(ids_ptr + m // T, mask=live, other=-1)
    r = tl.arange(0, R)
    v_rows = v_ptr + m.to(tl.int64)[:, None] * R + r[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for j in tl.static_range(N_ADAPTERS):
        mine = ids == j
        if tl.sum(mine.to(tl.int32), 0) > 0:
            v = tl.load(v_rows, mask=mine[:, None], other=0.0)
            b = tl.load(b_ptr + (j * N + n[:, None]).to(tl.int64) * R + r[None, :],
                        mask=n_ok[:, None], other=0.0).to(tl.float32)
            acc += tl.dot(v, tl.trans(b), input_precision="ieee")
    # rows without an adapter are neither read nor written
    routed = live & (ids >= 0) & (ids < N_ADAPTERS)
    mask = routed[:, None] & n_ok[None, :]
    dst = out_ptr + m.to(tl.int64)[:, None] * N + n[None, :]
    dt = out_ptr.dtype.element_ty
    o = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (o + acc.to(dt).to(tl.float32)).to(dt), mask=mask)


def add_grouped_lora_(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor) -> torch.Tensor:
    """out[i, t] += (x[i, t] @ a[ids[i]].T) @ b[ids[i]].T for every batch row i with ids[i] >= 0.

    In place; returns out. x [B, T, K]; out [B, T, N] contiguous; ids int32 with >= B entries
    (entries past B are not read); a [n, R, K], b [n, N, R] contiguous, R = rank_tile(...)."""
    B, T, K = x.shape
    n, R, _ = a.shape
    N = out.shape[-1]
    if out.shape != (B, T, N) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{B}, {T}, N] tensor, got {tuple(out.shape)}")
    if a.shape[2] != K or b.shape != (n, N, R) or R != rank_tile(R):
        raise ValueError(f"adapter stacks {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                         f"x {tuple(x.shape)} -> out {tuple(out.shape)}")
    if ids.dtype != torch.int32 or ids.numel() < B:
        raise ValueError(f"ids must be int32 with >= {B} entries, got {ids.dtype} {ids.numel()}")
    M = B * T
    if M == 0 or n == 0:
        return out
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    a, b = a.contiguous(), b.contiguous()
    v = torch.empty(M, R, dtype=torch.float32, device=x.device)
    if _INTERPRET:
        bm = min(128, max(16, triton.next_power_of_2(M)))
        bk = min(1024, max(16, triton.next_power_of_2(K)))
        bn = min(1024, max(16, triton.next_power_of_2(N)))
    else:  # a decode step has M <= a few hundred rows: small row tiles keep programs busy
        bm = 16 if M <= 16 else 32 if M <= 256 else 64
        bk, bn = 64, 64
    _shrink_kernel[(triton.cdiv(M, bm),)](x2, a, ids, v, M, K, T, x2.stride(0),
                                          N_ADAPTERS=n, R=R, BM=bm, BK=bk)
    _expand_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](v, b, ids, out, M, N, T,
                                                            N_ADAPTERS=n, R=R, BM=bm, BN=bn)
    return out
