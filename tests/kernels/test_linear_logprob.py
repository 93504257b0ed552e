"""linear_logprobs (all three backends) against fp64 torch on random data.

Shapes are deliberately not multiples of any block/chunk size (N=37, V=300, H=48 against blocks of
64x128x64 and CPU tiles of 16x128), a random per-token upstream gradient is used (an all-ones one
hides per-row scaling bugs), and a fifth of the tokens are ignored.

Tolerances: log-probs 2e-5 absolute for fp32 and bf16 inputs (the reference uses the same
bf16-rounded inputs in fp64, so only fp32 accumulation error remains). Gradients: fp32 1e-4 of the
largest reference entry; bf16 1.5e-2 of it (the gradients are returned in bf16, 2^-8 relative, and
the Triton path rounds dlogits to bf16 before its GEMMs).
"""

import pytest
import torch

from malt_fast.kernels import linear_logprobs
from malt_fast.kernels.dispatch import CpuLinearLogprob, TorchLinearLogprob
from malt_fast.kernels.linear_logprob import TritonLinearLogprob

N, V, H = 37, 300, 48
IGNORE = -100


def make(dtype, seed=0, n=N, v=V, h=H, ignore=IGNORE):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.7).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[: n // 5]] = ignore
    grad = torch.randn(n, generator=gen)
    return hidden, weight, targets, grad


def reference(hidden, weight, targets, grad, ignore=IGNORE):
    hd = hidden.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    valid = targets != ignore
    logp = torch.log_softmax(hd @ wd.t(), -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    logp = torch.where(valid, logp, 0.0)
    logp.backward(grad.double())
    return logp.detach(), hd.grad, wd.grad


# each backend with tile sizes small enough that several tiles/chunks/splits are merged
RUNNERS = {
    "cpu": lambda h, w, y, ig: CpuLinearLogprob.apply(h, w, y, ig, 16, 128),
    "torch": lambda h, w, y, ig: TorchLinearLogprob.apply(h, w, y, ig, 16, 128),
    "triton": lambda h, w, y, ig: TritonLinearLogprob.apply(h, w, y, ig, 2, 128),
}


def run(runner, hidden, weight, targets, grad, ignore=IGNORE):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = runner(h, w, targets, ignore)
    logp.backward(grad)
    return logp, h.grad, w.grad


def assert_close(got, ref, rel, what):
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_matches_fp64(backend, dtype):
    hidden, weight, targets, grad = make(dtype)
    logp, gh, gw = run(RUNNERS[backend], hidden, weight, targets, grad)
    ref, ref_h, ref_w = reference(hidden, weight, targets, grad)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert (logp[targets == IGNORE] == 0).all()
    assert (logp.double() - ref).abs().max().item() <= 2e-5
    rel = 1e-4 if dtype == torch.float32 else 1.5e-2
    assert_close(gh, ref_h, rel, "grad_hidden")
    assert_close(gw, ref_w, rel, "grad_weight")
    # ignored tokens contribute nothing: their hidden rows get exactly zero gradient
    assert (gh[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_public_entry_point(backend):
    """Default tiles, a custom ignore_index, int32 targets."""
    hidden, weight, targets, grad = make(torch.float32, seed=1, ignore=-1)
    logp, gh, gw = run(lambda h, w, y, ig: linear_logprobs(h, w, y.int(), ignore_index=ig,
                                                           backend=backend),
                       hidden, weight, targets, grad, ignore=-1)
    ref, ref_h, ref_w = reference(hidden, weight, targets, grad, ignore=-1)
    assert (logp.double() - ref).abs().max().item() <= 2e-5
    assert_close(gh, ref_h, 1e-4, "grad_hidden")
    assert_close(gw, ref_w, 1e-4, "grad_weight")


def test_cpu_multi_chunk_default_tiles():
    """More tokens than CHUNK_N and more vocab than CHUNK_V with the shipped tile sizes."""
    hidden, weight, targets, grad = make(torch.bfloat16, seed=2, n=600, v=4500, h=40)
    logp, gh, gw = run(lambda h, w, y, ig: linear_logprobs(h, w, y, ig), hidden, weight, targets,
                       grad)
    ref, ref_h, ref_w = reference(hidden, weight, targets, grad)
    assert (logp.double() - ref).abs().max().item() <= 2e-5
    assert_close(gh, ref_h, 1.5e-2, "grad_hidden")
    assert_close(gw, ref_w, 1.5e-2, "grad_weight")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_only_one_input_needs_grad_and_all_ignored(backend):
    hidden, weight, targets, grad = make(torch.float32, seed=3)
    w = weight.clone().requires_grad_()
    linear_logprobs(hidden, w, targets, backend=backend).backward(grad)
    _, _, ref_w = reference(hidden, weight, targets, grad)
    assert_close(w.grad, ref_w, 1e-4, "grad_weight")
    ignored = torch.full((N,), IGNORE)
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, weight, ignored, backend=backend)
    out.backward(grad)
    assert (out == 0).all() and (h.grad == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_saves_no_logits(backend):
    """What autograd keeps between forward and backward is O(N*H + V*H), never O(N*V)."""
    hidden, weight, targets, _ = make(torch.float32, seed=4, n=64, v=2000, h=16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        linear_logprobs(hidden.requires_grad_(), weight.requires_grad_(), targets,
                        backend=backend)
    assert saved and max(saved) <= weight.numel() and sum(saved) < 64 * 2000


@pytest.mark.parametrize("bad, message", [
    (lambda h, w, y: (h, w[:, :-1], y), "hidden size"),
    (lambda h, w, y: (h, w, y[:-1]), "targets"),
    (lambda h, w, y: (h, w, y.float()), "int64 or int32"),
    (lambda h, w, y: (h, w.double(), y), "dtype"),
    (lambda h, w, y: (h[None], w, y), "expected hidden"),
    (lambda h, w, y: (h, w, torch.where(y == IGNORE, y, V)), "outside the vocabulary"),
])
def test_bad_input(bad, message):
    hidden, weight, targets, _ = make(torch.float32)
    with pytest.raises(ValueError, match=message):
        linear_logprobs(*bad(hidden, weight, targets))
    with pytest.raises(ValueError, match="unknown backend"):
        linear_logprobs(hidden, weight, targets, backend="cuda")


AOT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)  # compile for real, for a GPU this machine does not have
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import malt_fast.kernels.linear_logprob as K

common = {"N": "i32", "V": "i32", "H": "i32", "stride_h": "i32", "stride_w": "i32"}
blocks = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "UPCAST": False}
for dt in ("bf16", "fp32"):
    fwd = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": "*i32", "m_ptr": "*fp32",
           "s_ptr": "*fp32", "tgt_ptr": "*fp32", **common, "cols_per_split": "i32"}
    bwd = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": "*i32", "lse_ptr": "*fp32",
           "g_ptr": "*fp32", "dz_ptr": f"*{dt}", **common, "stride_dz": "i32", "v_begin": "i32",
           "v_end": "i32"}
    for fn, sig in ((K._forward_kernel, fwd), (K._dlogits_kernel, bwd)):
        sig.update({k: "constexpr" for k in blocks})
        k = triton.compile(ASTSource(fn, sig, constexprs=blocks), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 8, "num_stages": 3})
        assert k.asm["cubin"] and k.metadata.shared <= 227 * 1024, (fn, dt, k.metadata.shared)
print("COMPILED")
"""


def test_kernels_compile_for_sm90():
    """No GPU here: compile both kernels ahead of time for an H100 (sm_90) with the shipped block
    sizes, so type errors, constexpr misuse and shared-memory overflow of the real (non-interpreted)
    path are caught on CPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("ahead-of-time Triton compilation took over 120 s")
    if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert proc.returncode == 0 and "COMPILED" in proc.stdout, proc.stderr[-3000:]


def test_the_device_side_target_check():
    """The check CUDA runs without a host sync (torch._assert_async), here on CPU tensors, where
    it raises at once: the same condition as the CPU path's."""
    from malt_fast.kernels.dispatch import assert_targets_in_vocab

    assert_targets_in_vocab(torch.tensor([0, 4, -100]), 5, -100)
    for bad in ([0, 5], [-1, 2], [-100, 7]):
        with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 5\)"):
            assert_targets_in_vocab(torch.tensor(bad), 5, -100)
