"""Fused linear log-prob in Triton: log p(y_t) = h_t . W[y_t] - logsumexp(h_t . W^T), never
materialising the [tokens x vocab] logits.

Forward: one program per (token block, vocab split); it walks its vocab range tile by tile, keeps an
online max / sum-of-exp per token in fp32 and picks up the target logit on the way. The splits are
merged with a logsumexp over a [splits, N] buffer, so the launch has enough programs even when N is
small, and nothing ever waits on the host. Only the LSE [N] is saved for the backward.

Backward: vocab is processed in chunks of `Vc` columns. A Triton kernel recomputes the chunk's logit
tiles exactly and writes dlogits = g * (onehot(y) - softmax) for [N, Vc]; two GEMMs turn it into
grad_hidden (accumulated in fp32 across chunks) and the chunk's rows of grad_weight (each row is
finished within its chunk, the GEMM accumulates over tokens in fp32). Extra memory: one [N, Vc]
chunk plus an fp32 [N, H] accumulator.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter evaluates tl.dot with numpy, which mis-handles bf16 operands: upcast there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST: tl.constexpr):
    # 64-bit offsets: V * H passes 2^31 for the largest vocab x hidden combinations
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:  # fp32 inputs: full-precision products, not TF32's 10-bit ones
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, tgt_ptr,
                    N, V, H, stride_h, stride_w, cols_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # an ignored/padded target never equals a column index >= 0 once mapped to -1
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(tgt_ptr + out, tgt, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr,
                    N, V, H, stride_h, stride_w, stride_dz, v_begin, v_end,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    col_ok = cols < v_end
    z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_H, UPCAST)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # already 0 on ignored tokens
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == y[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - p)
    tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _blocks(device_is_cuda: bool):
    # The interpreter pays ~1 ms per program instance: the same big tiles keep its grids small.
    if device_is_cuda and not _INTERPRET:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)


_MM_OUT_DTYPE = True


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation for bf16/fp16 operands too."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        if _MM_OUT_DTYPE:
            try:
                acc.add_(torch.mm(a, b, out_dtype=torch.float32))  # cuBLAS writes fp32 directly
                return
            except (RuntimeError, TypeError):  # older torch: no mixed-dtype mm
                _MM_OUT_DTYPE = False
        acc.add_(torch.mm(a, b))  # rounds each chunk's product to bf16, sums chunks in fp32
    else:  # CPU (interpreter tests): no mixed-dtype GEMM here, so upcast
        acc.addmm_(a.float(), b.float())


def triton_forward(hidden, weight, targets, ignore_index, splits=None):
    """Returns (logp [N] fp32, lse [N] fp32). `splits` (vocab splits) defaults to a size that fills
    the GPU; tests pass it to exercise the merge."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _blocks(hidden.is_cuda)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks = triton.cdiv(N, bn)
    if splits is None:
        if hidden.is_cuda and not _INTERPRET:
            sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
            splits = max(1, min(triton.cdiv(V, bv), triton.cdiv(4 * sms, n_blocks)))
        else:
            splits = 1
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), bv) * bv
    splits = triton.cdiv(V, cols_per_split)
    y = torch.where(targets == ignore_index, -1, targets).to(torch.int32)
    m = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    s = torch.empty_like(m)
    tgt = torch.empty_like(m)
    _forward_kernel[(n_blocks, splits)](
        hidden, weight, y, m, s, tgt, N, V, H, hidden.stride(0), weight.stride(0), cols_per_split,
        UPCAST=_INTERPRET, **cfg)
    lse = torch.logsumexp(m + torch.log(s), dim=0)
    logp = torch.where(targets != ignore_index, tgt.sum(0) - lse, 0.0)
    return logp, lse


def triton_backward(hidden, weight, targets, lse, grad_logp, ignore_index,
                    chunk_bytes=128 << 20, chunk_cols=None, need_h=True, need_w=True):
    """grad_hidden, grad_weight (input dtypes) for upstream grad_logp [N]."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _blocks(hidden.is_cuda)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    if chunk_cols is None:
        chunk_cols = max(bv, chunk_bytes // (max(N, 1) * hidden.element_size()) // bv * bv)
    chunk_cols = min(chunk_cols, triton.cdiv(V, bv) * bv)
    valid = targets != ignore_index
    y = torch.where(valid, targets, -1).to(torch.int32)
    g = torch.where(valid, grad_logp.float(), 0.0).contiguous()
    grad_h = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    dz = torch.empty(N, chunk_cols, dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, V, chunk_cols):
        v1 = min(v0 + chunk_cols, V)
        d = dz[:, : v1 - v0]
        grid = (triton.cdiv(N, bn), triton.cdiv(v1 - v0, bv))
        _dlogits_kernel[grid](hidden, weight, y, lse, g, d, N, V, H, hidden.stride(0),
                              weight.stride(0), d.stride(0), v0, v1, UPCAST=_INTERPRET, **cfg)
        if need_h:
            _acc_mm(grad_h, d, weight[v0:v1])
        if need_w and (hidden.dtype == torch.float32 or hidden.is_cuda):
            torch.mm(d.t(), hidden, out=grad_w[v0:v1])  # rows finished here: one rounding
        elif need_w:
            grad_w[v0:v1] = torch.mm(d.t().float(), hidden.float())
    return (grad_h.to(hidden.dtype) if need_h else None), grad_w


class TritonLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, splits=None, chunk_cols=None):
        logp, lse = triton_forward(hidden, weight, targets, ignore_index, splits)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index, ctx.chunk_cols = ignore_index, chunk_cols
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        gh, gw = triton_backward(hidden, weight, targets, lse, grad_logp, ctx.ignore_index,
                                 chunk_cols=ctx.chunk_cols, need_h=need_h, need_w=need_w)
        return gh, gw, None, None, None, None

