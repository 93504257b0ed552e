"""The fused RMSNorm / RoPE / SiLU-mul Triton kernels (interpreted on CPU; on the GPU in
tests/rollout/test_cuda.py through the engine) against fp64 math and the model's torch ops.

Odd sizes: 5 heads, head_dim 24 (12 pairs, not a power of two), hidden 72, 3 x 7 tokens, a
SiLU-mul of 4101 elements per row. The kernels round where the torch ops round, so in fp32 they
agree with them to 1e-6 (relative to the largest entry). In bf16 the interpreter converts fp32 to
bf16 by truncation, not to nearest (checked: 502 of 1024 random values differ), so two roundings
may each be one bf16 ulp off: 2^-6 relative; on the GPU they round to nearest.
"""

import pytest
import torch
import torch.nn.functional as F

from malt_fast.kernels.layer_ops import apply_rope, rms_norm, silu_mul
from malt_fast.model import llama

DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -6)]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 72, generator=gen) * 3).to(dtype)
    norm = llama.RMSNorm(72, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(72, generator=gen))
    norm = norm.to(dtype)
    xd = x.double()
    ref = norm.weight.double() * xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    with torch.no_grad():
        ours, torch_op = rms_norm(x, norm.weight, 1e-5), norm(x)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert rel_err(ours, ref) < 2 * tol
    assert rel_err(ours, torch_op) <= tol


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_row_positions", [False, True])
def test_rope_equals_the_models_rope(dtype, tol, per_row_positions):
    gen = torch.Generator().manual_seed(1)
    B, T, H, D = 3, 7, 5, 24
    cfg = llama.LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=1,
                            rope_theta=500.0)
    # the projection layout: [B, T, H, D] viewed as [B, H, T, D]
    x = torch.randn(B, T, H, D, generator=gen).to(dtype).transpose(1, 2)
    pos = (torch.randint(0, 300, (B, T), generator=gen) if per_row_positions
           else torch.arange(40, 40 + T)[None])
    cos, sin = llama.rope_cos_sin(llama.rope_inv_freq(cfg), pos, dtype)
    ours = apply_rope(x, cos, sin)
    torch_op = llama.apply_rope(x, cos, sin)
    assert ours.shape == x.shape and ours.dtype == dtype
    assert rel_err(ours, torch_op) <= tol
    # fp64: rotate each pair (d, d + D/2) by its angle
    xd, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    x1, x2 = xd[..., : D // 2], xd[..., D // 2:]
    ref = torch.cat([x1 * c[..., : D // 2] - x2 * s[..., : D // 2],
                     x2 * c[..., D // 2:] + x1 * s[..., D // 2:]], -1)
    assert rel_err(ours, ref) < 2 * tol
    # a decode step (T = 1): its rows come out contiguous (the attention kernels read them)
    step = apply_rope(x[:, :, :1], cos[:, :1], sin[:, :1])
    assert step[:, :, 0].is_contiguous()
    assert torch.equal(step, ours[:, :, :1])


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
def test_silu_mul(dtype, tol):
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(3, 7, 4101, generator=gen) * 4).to(dtype)  # 4101: a partial block
    u = torch.randn(3, 7, 4101, generator=gen).to(dtype)
    ours = silu_mul(g, u)
    ref = F.silu(g.double()) * u.double()
    assert rel_err(ours, ref) < 2 * tol
    assert rel_err(ours, F.silu(g) * u) <= tol
