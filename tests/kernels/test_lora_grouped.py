"""The grouped LoRA kernels (kernels/lora_grouped.py) against fp64 torch: each batch row's
update through its own adapter of the stack, none for id -1.

Odd sizes (72 -> 97, and 1100 -> 1030, which takes two K steps and two N tiles of the
interpreter's 1024-wide tiles), odd ranks 3, 5, 7 zero-padded to 16, ids shuffled with repeats,
-1 rows and an adapter left out; decode (T = 1) and prefill (T > 1, row tiles that straddle
sequences and adapters); x and out in fp32 and bf16 (the adapters stay fp32, as LoRALinear keeps
them). Interpreted on CPU; the same cases compiled on CUDA, plus a CUDA-graph replay that picks
up ids rewritten in place, when a GPU is present (TRITON_INTERPRET=0).

Tolerances relative to the largest output entry: fp32 1e-6; bf16 2^-6 (the update is rounded to
bf16 and then the sum, each a bf16 ulp at most; the interpreter rounds fp32 -> bf16 by
truncation, see test_layer_ops.py). Rows with id -1 must be bit-identical to their input.
"""

import os

import pytest
import torch

from malt_fast.kernels.lora_grouped import add_grouped_lora_, rank_tile

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RANKS = (3, 5, 7)
SCALING = (2.0, 0.8, 1.5)
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -6)]
# (batch rows, tokens per row, in, out, adapter id per row)
CASES = {
    "decode": (13, 1, 72, 97, [2, -1, 0, 2, 1, -1, 0, 0, 2, -1, 1, 2, 0]),
    "prefill": (5, 7, 72, 97, [1, 2, -1, 1, 0]),
    "one_adapter_absent": (9, 3, 72, 97, [2, 2, -1, 0, 2, 0, -1, 0, 2]),
    "wide": (6, 2, 1100, 1030, [0, -1, 2, 1, 1, 0]),
}


def make(case, dtype, seed=0, device="cpu"):
    """x, out (the base output), ids, the stacks a, b and the fp64 reference."""
    B, T, K, N, ids = CASES[case]
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, K, generator=g) / K ** 0.5 for r in RANKS]
    Bw = [torch.randn(N, r, generator=g) for r in RANKS]
    R = rank_tile(max(RANKS))
    a = torch.zeros(len(RANKS), R, K)
    b = torch.zeros(len(RANKS), N, R)
    for j, r in enumerate(RANKS):
        a[j, :r], b[j, :, :r] = A[j], Bw[j] * SCALING[j]
    x = torch.randn(B, T, K, generator=g).to(dtype)
    out = torch.randn(B, T, N, generator=g).to(dtype)
    ref = out.double().clone()
    for i, k in enumerate(ids):
        if k >= 0:
            ref[i] += (x[i].double() @ A[k].double().T) @ Bw[k].double().T * SCALING[k]
    # a buffer longer than the batch, as the view's (entries past B are never read)
    buf = torch.full((64,), 1, dtype=torch.int32)
    buf[:B] = torch.tensor(ids, dtype=torch.int32)
    to = dict(device=device)
    return x.to(**to), out.to(**to), buf.to(**to), a.to(**to), b.to(**to), ref


def check(case, dtype, tol, device):
    x, out, ids, a, b, ref = make(case, dtype, device=device)
    base = out.clone()
    got = add_grouped_lora_(out, x, ids, a, b)
    assert got is out and got.dtype == dtype
    got = got.cpu()
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, err
    none = torch.tensor(CASES[case][4]) < 0
    assert torch.equal(got[none], base.cpu()[none])
    routed = (got.double() - base.cpu().double())[~none].abs().max().item()
    assert routed > 20 * tol * ref.abs().max().item()  # the updates are real


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_against_fp64(case, dtype, tol):
    check(case, dtype, tol, "cpu")


def test_inputs_are_checked():
    x, out, ids, a, b, _ = make("decode", torch.float32)
    with pytest.raises(ValueError, match="int32"):
        add_grouped_lora_(out, x, ids.long(), a, b)
    with pytest.raises(ValueError, match="int32"):
        add_grouped_lora_(out, x, ids[:5], a, b)
    with pytest.raises(ValueError, match="stacks"):
        add_grouped_lora_(out, x, ids, a[:, :7], b[:, :, :7])  # rank not padded to a tile
    with pytest.raises(ValueError, match="contiguous"):
        add_grouped_lora_(out.transpose(0, 1), x, ids, a, b)


def cuda_only(test):
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    return pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 would run the "
                              "interpreter, not the compiled kernel")(test)


@cuda_only
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_against_fp64(case, dtype, tol):
    check(case, dtype, tol, "cuda")


@cuda_only
def test_cuda_graph_replays_rewritten_ids():
    x, out, ids, a, b, _ = make("decode", torch.bfloat16, device="cuda")
    base = out.clone()
    add_grouped_lora_(out, x, ids, a, b)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(base)
        add_grouped_lora_(out, x, ids, a, b)
    first = ids.clone()
    new = [0, 2, -1, -1, 1, 1, 2, 0, -1, 2, 0, 1, -1]
    ids[: len(new)] = torch.tensor(new, dtype=torch.int32, device="cuda")
    graph.replay()
    want = add_grouped_lora_(base.clone(), x, ids, a, b)
    assert torch.equal(out, want)
    assert not torch.equal(out, add_grouped_lora_(base.clone(), x, first, a, b))
