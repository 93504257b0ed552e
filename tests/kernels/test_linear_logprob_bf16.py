"""The C++ head's bf16 GEMM path (AVX512-BF16, csrc/bf16_gemm.cpp) against fp64 torch.

The micro-kernel on its own (torch.ops.malt_fast.bf16_gemm_f32), then the head through it: odd N,
H and V (no multiple of the 12-row register tile, the 32-column panels, or the tile sizes), random
upstream gradients, ignored tokens, and the same tolerances as test_linear_logprob.py (log-probs
2e-5 absolute; bf16 gradients 1.5e-2 of the largest reference entry: the path rounds dlogits to
bf16 before its two gradient GEMMs, as eager bf16 autograd does). On a CPU without AVX512-BF16, or
under MALT_FAST_ISA=plain|avx2|avx512, the head tests run the fp32 GEMM path, and the tests that
need the bf16 one skip.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import malt_fast._C as C
from malt_fast.kernels.dispatch import CpuLinearLogprob

from test_linear_logprob import assert_close, make, reference, run

ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


needs_bf16 = pytest.mark.skipif(not C.cpu_bf16_gemm(),
                                reason="no AVX512-BF16 here, or MALT_FAST_ISA caps it")


def gemm_bound(a, b):
    """fp32 accumulation of K exact bf16 products: |error| <= K * 2^-24 * (|a| @ |b|) per entry."""
    return a.shape[1] * 2.0 ** -24 * (a.double().abs() @ b.double().abs())


@needs_bf16
@pytest.mark.parametrize("M, K, N", [(37, 71, 45), (1, 1, 1), (26, 72, 33), (13, 576, 100),
                                     (200, 9, 1001)])
def test_gemm_matches_fp64(M, K, N):
    gen = torch.Generator().manual_seed(M * K * N)
    a = torch.randn(M, K, generator=gen).bfloat16()
    b = torch.randn(K, N, generator=gen).bfloat16()
    w = torch.randn(N, K, generator=gen).bfloat16()
    gemm = torch.ops.malt_fast.bf16_gemm_f32
    # b contiguous: pairs packed along its rows; w.t(): pairs along w's rows (the head's W^T)
    for rhs in (b, w.t()):
        got = gemm(a, rhs)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        ref = a.double() @ rhs.double()
        assert ((got.double() - ref).abs() <= gemm_bound(a, rhs)).all()


@needs_bf16
def test_gemm_rejects_other_dtypes():
    a = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="bf16 inputs only"):
        torch.ops.malt_fast.bf16_gemm_f32(a, a.t())


# (N, V, H, chunk_n, chunk_v): odd H needs the zero pad pair; chunk_n=13 leaves a one-row tile
# and odd token counts per chunk (an unpaired last token); chunk_v=100 and V=1001 leave a
# one-column vocab chunk; the shipped tiles (512 x 4096) run one tile
SHAPES = [
    (37, 1001, 72, 16, 128),
    (37, 1001, 71, 13, 100),
    (50, 301, 9, 12, 32),
    (37, 1001, 72, 512, 4096),
]


@pytest.mark.parametrize("n, v, h, chunk_n, chunk_v", SHAPES)
def test_head_matches_fp64(n, v, h, chunk_n, chunk_v):
    hidden, weight, targets, grad = make(torch.bfloat16, seed=n + v + h, n=n, v=v, h=h)
    logp, gh, gw = run(lambda a, b, y, ig: CpuLinearLogprob.apply(a, b, y, ig, chunk_n, chunk_v),
                       hidden, weight, targets, grad)
    ref, ref_h, ref_w = reference(hidden, weight, targets, grad)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert (logp[targets == IGNORE] == 0).all()
    assert (logp.double() - ref).abs().max().item() <= 2e-5
    assert_close(gh, ref_h, 1.5e-2, "grad_hidden")
    assert_close(gw, ref_w, 1.5e-2, "grad_weight")
    assert (gh[targets == IGNORE] == 0).all()


def test_head_one_input_needs_grad():
    hidden, weight, targets, grad = make(torch.bfloat16, seed=5, n=37, v=1001, h=71)
    _, ref_h, ref_w = reference(hidden, weight, targets, grad)
    w = weight.clone().requires_grad_()
    CpuLinearLogprob.apply(hidden, w, targets, IGNORE, 16, 128).backward(grad)
    assert_close(w.grad, ref_w, 1.5e-2, "grad_weight")
    h = hidden.clone().requires_grad_()
    CpuLinearLogprob.apply(h, weight, targets, IGNORE, 16, 128).backward(grad)
    assert_close(h.grad, ref_h, 1.5e-2, "grad_hidden")


CAPPED = r"""
import json, sys, torch
import malt_fast._C as C
from malt_fast.kernels.dispatch import CpuLinearLogprob
hidden, weight, targets, grad = torch.load(sys.argv[1])
h = hidden.clone().requires_grad_()
w = weight.clone().requires_grad_()
logp = CpuLinearLogprob.apply(h, w, targets, -100, 16, 128)
logp.backward(grad)
torch.save((logp.detach(), h.grad, w.grad), sys.argv[2])
print(json.dumps({"isa": C.cpu_isa(), "bf16_gemm": C.cpu_bf16_gemm()}))
"""


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="this CPU has no avx512_bf16")
def test_bf16_path_is_taken_and_a_cap_falls_back(tmp_path):
    """Where /proc/cpuinfo lists avx512_bf16 the head takes the bf16 GEMMs (unless the run is
    capped); MALT_FAST_ISA=avx512 and =avx2 in a subprocess turn them off. Both paths agree with
    fp64, and they are different arithmetic: the bf16 path's gradients (dlogits rounded to bf16)
    differ from the fp32 path's."""
    if os.environ.get("MALT_FAST_ISA") in ("plain", "avx2", "avx512"):
        assert not C.cpu_bf16_gemm()
        pytest.skip("this run is capped by MALT_FAST_ISA")
    assert C.cpu_bf16_gemm()
    problem = make(torch.bfloat16, seed=6, n=37, v=1001, h=72)
    ref, ref_h, ref_w = reference(*problem)
    ours = run(lambda a, b, y, ig: CpuLinearLogprob.apply(a, b, y, ig, 16, 128), *problem)
    torch.save(problem, tmp_path / "problem.pt")
    for cap, isa in (("avx512", "avx512"), ("avx2", "avx2")):
        env = dict(os.environ, MALT_FAST_ISA=cap)
        proc = subprocess.run([sys.executable, "-c", CAPPED, str(tmp_path / "problem.pt"),
                               str(tmp_path / f"{cap}.pt")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"isa": isa,
                                                                     "bf16_gemm": False}
        logp, gh, gw = torch.load(tmp_path / f"{cap}.pt")
        assert (logp.double() - ref).abs().max().item() <= 2e-5
        assert_close(gh, ref_h, 1.5e-2, f"grad_hidden ({cap})")
        assert_close(gw, ref_w, 1.5e-2, f"grad_weight ({cap})")
        assert not torch.equal(gw, ours[2]), f"{cap}: same grad_weight bits as the bf16 path"
