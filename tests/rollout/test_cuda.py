"""CUDA-only checks, skipped without a GPU: the compiled Triton decode kernel against fp64
attention, and the engine with CUDA graphs against transformers and against eager steps.

Their CPU twins (the kernel under TRITON_INTERPRET=1, the fixed-shape steps run eagerly) are in
test_decode_attention.py and test_engine.py; these run where a GPU is lent (docs/rollout.md)."""

import pytest
import torch

from test_decode_attention import TRITON_CASES, build_paged, plain_attention
from test_engine import PROMPTS, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_CASES = TRITON_CASES + [
    # 48 branches in 16 groups of 3 sharing 320 tokens, own suffixes of odd lengths; Llama-8B heads
    ([321 + 7 * i for i in range(48)], [None if i % 3 == 0 else (i - i % 3, 320)
                                        for i in range(48)], 32, 8, 128, 16),
    # SmolLM2 heads, shared prefixes of different lengths
    ([700, 710, 523, 530, 537, 17], [None, (0, 688), None, (2, 512), (2, 512), None], 9, 3, 64, 16),
]


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "flat"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_triton_kernel_on_gpu(cascade, dtype, tol, case):
    from malt_fast.kernels.decode_attention import paged_decode_attention

    lengths, shared, Hq, Hkv, D, bs = GPU_CASES[case]
    ks, vs, k_pool, v_pool, tables, lens = build_paged(lengths, shared, Hkv, D, bs, dtype, case)
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(case)).to(dtype)
    out = paged_decode_attention(q.cuda(), k_pool.cuda(), v_pool.cuda(), tables.cuda(),
                                 lens.cuda(), D ** -0.5, cascade=cascade)
    ref = plain_attention(q, ks, vs, D ** -0.5)
    err = (out.cpu().double() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e}"


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory):
    return tiny_llama(tmp_path_factory, "cuda")


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_engine_greedy_matches_transformers_on_gpu(tiny_cuda, graphs):
    from malt_fast.rollout import Engine

    hf, ours = tiny_cuda
    eng = Engine(ours, None, block_size=16, max_batch=8, progress=False, cuda_graphs=graphs)
    out = eng.generate(PROMPTS, n=2, max_new_tokens=40)
    assert (eng.graphs is not None) == graphs
    if graphs:
        assert eng.graphs.graphs, "no CUDA graph was captured"
    for prompt, comps in zip(PROMPTS, out):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=40,
                              do_sample=False, eos_token_id=[3], pad_token_id=3,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long,
                                                        device="cuda"))
        ref = ref[0, len(prompt):].tolist()
        assert comps == [ref, ref]


def test_graph_steps_sample_like_eager_steps_on_gpu(tiny_cuda):
    from malt_fast.rollout import Engine

    _, ours = tiny_cuda
    prompts = [list(range(10, 42)), list(range(60, 77)), list(range(100, 164))]
    runs = []
    for graphs in (True, False):
        eng = Engine(ours, None, block_size=16, max_batch=12, progress=False, cuda_graphs=graphs)
        runs.append(eng.generate(prompts, n=4, max_new_tokens=30, temperature=0.9, seed=11))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_layer_ops_on_gpu(dtype):
    """Compiled, the fused kernels round to nearest as torch does: RoPE within two ulps of
    its inputs' scale (the compiler may fuse a multiply-add), RMSNorm within two ulps
    (summation order), SiLU-mul within eight (Triton's exp differs in its last bits)."""
    import torch.nn.functional as F

    from malt_fast.kernels.layer_ops import apply_rope, rms_norm, silu_mul
    from malt_fast.model import llama

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 5, 64, generator=gen).to("cuda", dtype).transpose(1, 2)
    pos = torch.randint(0, 4000, (4, 9), generator=gen).cuda()
    cfg = llama.LlamaConfig(hidden_size=320, num_attention_heads=5, num_key_value_heads=1)
    cos, sin = llama.rope_cos_sin(llama.rope_inv_freq(cfg), pos, dtype)
    ulp = 2 ** -23 if dtype == torch.float32 else 2 ** -8
    diff = (apply_rope(x, cos, sin) - llama.apply_rope(x, cos, sin)).abs().max()
    assert diff <= 2 * ulp * x.abs().max()
    g = (torch.randn(7, 1536, generator=gen) * 4).to("cuda", dtype)
    u = torch.randn(7, 1536, generator=gen).to("cuda", dtype)
    ref = F.silu(g) * u
    # fp32: Triton's exp is not torch's to the last bits (measured: up to ~2.5 ulp)
    assert ((silu_mul(g, u) - ref).abs() <= 8 * ulp * ref.abs() + 1e-30).all()
    norm = llama.RMSNorm(1536, 1e-5).to("cuda", dtype)
    h = (torch.randn(7, 1536, generator=gen) * 3).to("cuda", dtype)
    with torch.no_grad():
        ours = rms_norm(h, norm.weight, 1e-5)
        with torch.enable_grad():  # the torch path (fused ops serve inference only)
            theirs = norm(h).detach()
    assert ((ours - theirs).abs() <= 2 * ulp * theirs.abs() + 1e-30).all()


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_multi_adapter_engine_on_gpu(graphs):
    """The compiled grouped-LoRA kernels inside the engine (prefill and decode, captured or
    eager): rows of three adapters and the base decode together, each greedy row equal to its
    role's merged-weights engine, fp32 (the CPU twins: test_prefix_index.py)."""
    from test_prefix_index import check_multi_adapter_engine, with_adapters

    eng = check_multi_adapter_engine(with_adapters().cuda(), "triton", graphs, count=12,
                                     budget=12)
    assert (eng.graphs is not None and bool(eng.graphs.graphs)) == graphs
