"""linear_logprobs on CUDA, the compiled Triton kernel (not the interpreter): against fp64 torch
in fp32 and bf16, at odd N, H and V, with ignored targets, a random upstream gradient, and
gradients for hidden and weight, one at a time and together. Skipped without a GPU; the same
kernel runs under TRITON_INTERPRET=1 on the CPU in test_linear_logprob.py, whose tolerances these
are. Run on a GPU machine with TRITON_INTERPRET=0 (benchmarks/gpu_session.sh does).

Under the interpreter bf16 tl.dot operands are upcast, so only a GPU run checks the bf16 tensor-
core path, with its bf16 dlogits.
"""

import os

import pytest
import torch

from test_linear_logprob import IGNORE, assert_close, make, reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 would run the interpreter, not the compiled kernel"),
]


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-4), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("n, v, h", [(37, 300, 48), (1001, 32003, 576), (4099, 49157, 96)])
@pytest.mark.parametrize("needs", ["both", "hidden", "weight"])
def test_compiled_triton_matches_fp64(dtype, rel, n, v, h, needs):
    from malt_fast.kernels import linear_logprobs

    hidden, weight, targets, grad = make(dtype, seed=n, n=n, v=v, h=h)
    ref, ref_h, ref_w = reference(hidden, weight, targets, grad)
    hc = hidden.cuda().requires_grad_(needs in ("both", "hidden"))
    wc = weight.cuda().requires_grad_(needs in ("both", "weight"))
    logp = linear_logprobs(hc, wc, targets.cuda(), ignore_index=IGNORE)
    assert logp.dtype == torch.float32 and logp.is_cuda
    logp.backward(grad.cuda())
    assert (logp[targets.cuda() == IGNORE] == 0).all()
    assert (logp.double().cpu() - ref).abs().max().item() <= 2e-5 * max(1.0, ref.abs().max().item())
    if hc.requires_grad:
        assert hc.grad.dtype == dtype
        assert_close(hc.grad.cpu(), ref_h, rel, "grad_hidden")
        assert (hc.grad[targets.cuda() == IGNORE] == 0).all()
    if wc.requires_grad:
        assert wc.grad.dtype == dtype
        assert_close(wc.grad.cpu(), ref_w, rel, "grad_weight")
