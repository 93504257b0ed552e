"""`linear_logprobs`: input checks, backend choice, the C++ CPU path's autograd.Function and a
chunked pure-torch path (the portable fallback and a readable statement of the algorithm)."""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cpu", "torch")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# Tile sizes of the CPU paths: a [CHUNK_N, CHUNK_V] fp32 tile is 8 MiB, big enough for GEMMs to
# run near peak and small enough to stay a rounding error next to the model.
CHUNK_N = 512
CHUNK_V = 4096


def _check(hidden, weight, targets, ignore_index, backend):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) \
            or not isinstance(targets, torch.Tensor):
        raise ValueError("linear_logprobs: hidden, weight and targets must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError("linear_logprobs: expected hidden [N, H], weight [V, H], targets [N]; "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: hidden size {hidden.shape[1]} != weight's "
                         f"{weight.shape[1]}")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"linear_logprobs: {hidden.shape[0]} hidden rows but {targets.shape[0]} "
                         "targets")
    if hidden.dtype not in _FLOATS or weight.dtype != hidden.dtype:
        raise ValueError("linear_logprobs: hidden/weight must share a dtype in fp32/bf16/fp16; "
                         f"got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_logprobs: targets must be int64 or int32, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"linear_logprobs: tensors on different devices ({hidden.device}, "
                         f"{weight.device}, {targets.device})")
    if not isinstance(ignore_index, int):
        raise ValueError(f"linear_logprobs: ignore_index must be an int, got {ignore_index!r}")
    if backend not in BACKENDS:
        raise ValueError(f"linear_logprobs: unknown backend {backend!r} "
                         f"(one of {BACKENDS} or None)")
    if backend == "cpu" and hidden.device.type != "cpu":
        raise ValueError(f"linear_logprobs: backend 'cpu' needs CPU tensors, got {hidden.device}")
    if backend == "triton" and hidden.device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("linear_logprobs: backend 'triton' on CPU tensors needs "
                         "TRITON_INTERPRET=1 set before triton is imported")
    if hidden.device.type == "cpu" and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            t = int(targets[bad][0])
            raise ValueError(f"linear_logprobs: target {t} is outside the vocabulary "
                             f"[0, {weight.shape[0]}) and is not ignore_index ({ignore_index})")
    elif targets.numel():
        assert_targets_in_vocab(targets, weight.shape[0], ignore_index)


def assert_targets_in_vocab(targets, vocab: int, ignore_index: int) -> None:
    """On the device, without a host sync: an out-of-range target (a tokenizer that does not
    fit the model) stops the program with a device-side assert instead of reading another
    row's memory. On CPU tensors it raises at once (the CPU path reports the target itself)."""
    ok = (targets == ignore_index) | ((targets >= 0) & (targets < vocab))
    torch._assert_async(ok.all(), f"linear_logprobs: a target is outside the vocabulary "
                                  f"[0, {vocab}) and is not ignore_index ({ignore_index})")


def linear_logprobs(hidden, weight, targets, ignore_index=-100, backend=None):
    """log p(targets) under softmax(hidden @ weight.T), fp32 [N]; 0 where targets == ignore_index.

    hidden [N, H] and weight [V, H] (the lm_head) in fp32, bf16 or fp16; targets [N] int. Gradients
    flow to hidden and weight. The [N, V] logits are never materialised. backend: "triton" (GPU, or
    CPU tensors under TRITON_INTERPRET=1), "cpu" (C++), "torch" (chunked torch ops), or None for
    triton on CUDA tensors and cpu otherwise.
    """
    if backend is None:
        backend = "triton" if isinstance(hidden, torch.Tensor) and hidden.is_cuda else "cpu"
    _check(hidden, weight, targets, ignore_index, backend)
    targets = targets.long()
    if backend == "triton":
        from malt_fast.kernels.linear_logprob import TritonLinearLogprob

        return TritonLinearLogprob.apply(hidden.contiguous(), weight.contiguous(), targets,
                                         ignore_index)
    if backend == "cpu":
        return CpuLinearLogprob.apply(hidden, weight, targets, ignore_index)
    return TorchLinearLogprob.apply(hidden, weight, targets, ignore_index)


class CpuLinearLogprob(torch.autograd.Function):
    """The C++ path (csrc/linear_logprob.cpp); saves hidden, weight, targets and the LSE only."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_n=CHUNK_N, chunk_v=CHUNK_V):
        import malt_fast._C  # noqa: F401  registers torch.ops.malt_fast.*

        logp, lse = torch.ops.malt_fast.linear_logprob_forward(hidden, weight, targets,
                                                               ignore_index, chunk_n, chunk_v)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args = (ignore_index, chunk_n, chunk_v)
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        ignore_index, chunk_n, chunk_v = ctx.args
        need_h, need_w = ctx.needs_input_grad[:2]
        gh, gw = torch.ops.malt_fast.linear_logprob_backward(
            hidden, weight, targets, lse, grad.contiguous(), ignore_index, need_h, need_w,
            chunk_n, chunk_v)
        return (gh if need_h else None), (gw if need_w else None), None, None, None, None


def _chunks(n, size):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class TorchLinearLogprob(torch.autograd.Function):
    """Same algorithm as the kernels in plain torch ops: [chunk_n, chunk_v] fp32 tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_n=CHUNK_N, chunk_v=CHUNK_V):
        N, V = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        y = torch.where(valid, targets, 0)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        tgt = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        rows = torch.arange(N, device=hidden.device)
        for n0, n1 in _chunks(N, chunk_n):
            h = hidden[n0:n1].float()
            parts = []
            for v0, v1 in _chunks(V, chunk_v):
                z = h @ weight[v0:v1].float().t()
                parts.append(z.logsumexp(1))
                local = y[n0:n1] - v0
                hit = (local >= 0) & (local < v1 - v0)
                tgt[n0:n1] += torch.where(hit, z[rows[: n1 - n0], local.clamp(0, v1 - v0 - 1)], 0.0)
            lse[n0:n1] = torch.stack(parts).logsumexp(0)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args = (ignore_index, chunk_n, chunk_v)
        return torch.where(valid, tgt - lse, 0.0)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        ignore_index, chunk_n, chunk_v = ctx.args
        need_h, need_w = ctx.needs_input_grad[:2]
        N, V = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        y = torch.where(valid, targets, 0)
        g = torch.where(valid, grad.float(), 0.0)
        gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        gw = torch.empty_like(weight) if need_w else None
        rows = torch.arange(N, device=hidden.device)
        for v0, v1 in _chunks(V, chunk_v):
            w = weight[v0:v1].float()
            gw_c = torch.zeros(v1 - v0, w.shape[1], dtype=torch.float32, device=w.device)
            for n0, n1 in _chunks(N, chunk_n):
                h = hidden[n0:n1].float()
                dz = torch.exp(h @ w.t() - lse[n0:n1, None]) * -g[n0:n1, None]
                local = y[n0:n1] - v0
                hit = (local >= 0) & (local < v1 - v0)
                r = rows[: n1 - n0][hit]
                dz[r, local[hit]] += g[n0:n1][hit]
                if need_h:
                    gh[n0:n1].addmm_(dz, w)
                if need_w:
                    gw_c.addmm_(dz.t(), h)
            if need_w:
                gw[v0:v1] = gw_c
        return (gh.to(hidden.dtype) if need_h else None), gw, None, None, None, None
