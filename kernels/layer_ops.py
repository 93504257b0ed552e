"""The small per-layer ops of a Llama forward, one Triton kernel each: RMSNorm, RoPE, SiLU-mul.

In torch each is a chain of 3-8 elementwise kernels (casts, pow, mean, rsqrt, cat, neg, ...).
A decode step of a small model is bound by the number of kernels, not their bytes, so fusing
these cuts a SmolLM2 step from ~42 kernels per layer to ~18, for a CUDA-graph replay and even
more for an eager prefill, whose cost is the host launching each op.

Each kernel rounds where the torch code it replaces rounds (a bf16 product is rounded before it
is added, as torch's bf16 ops do). On the H200 the outputs are within two ulps of the torch ops'
for RoPE (the compiler may fuse a multiply-add) and RMSNorm (summation order), and within eight
for SiLU-mul (Triton's exp differs in its last bits; ~2.5 ulp measured in fp32). Inference
only: no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    # normalised in fp32, rounded to the activation dtype, then scaled (as RMSNorm.forward)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim, normalised in fp32; x contiguous or not."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, shape[-1], eps,
                                     BLOCK=triton.next_power_of_2(shape[-1]))
    return out.view(shape)


# Triton compiles a variant per value class of each int argument (1, a multiple of 16, other):
# token counts and strides change from call to call, so those are not specialised (each
# variant is a compile of ~0.5 s in the middle of a rollout)
@triton.jit(do_not_specialize=["T", "sx_b", "sx_h", "sx_t", "sc_b", "sc_t"])
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, sx_b, sx_h, sx_t, sc_b, sc_t,
                 HALF: tl.constexpr, HB: tl.constexpr, DB: tl.constexpr):
    """One token: all heads of x rotated by that token's cos/sin (half-split pairs)."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    h = tl.arange(0, HB)[:, None]
    d = tl.arange(0, DB)[None, :]
    mask = (h < H) & (d < HALF)
    src = x_ptr + b * sx_b + t * sx_t + h * sx_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    cs = b * sc_b + t * sc_t + d
    dmask = d < HALF
    c1 = tl.load(cos_ptr + cs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + HALF, mask=dmask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # x * cos + cat(-x2, x1) * sin, each product rounded to the dtype before the sum
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    # out is [B, T, H, D] contiguous
    dst = out_ptr + ((b * T + t) * H + h) * (2 * HALF) + d
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] (any strides; last dim contiguous) rotated by cos/sin [B or 1, T, D].

    Returns [B, H, T, D] as a transposed view of a contiguous [B, T, H, D] (the layout the
    projections produce, so a decode step's x[:, :, 0] is contiguous)."""
    B, H, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    out = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    _rope_kernel[(B * T,)](x, cos, sin, out, T, H, x.stride(0), x.stride(1), x.stride(2),
                           cos_b, cos.stride(1), HALF=D // 2, HB=triton.next_power_of_2(H),
                           DB=triton.next_power_of_2(D // 2))
    return out.transpose(1, 2)


@triton.jit(do_not_specialize=["n"])
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu(g) rounded, as F.silu
    tl.store(out_ptr + offs, (act * u).to(dt), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for two tensors of one shape."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 4096
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
    return out
