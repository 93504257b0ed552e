"""The engine's prefix index: requests start from the longest prefix cached with their weights;
outputs equal an engine without reuse, and the prefill counts are exact."""

import os
import random

import pytest
import torch

from malt_fast.model.llama import Llama, LlamaConfig
from malt_fast.rollout import Engine
from malt_fast.rollout.engine import Request


def tiny_model(seed=0):
    torch.manual_seed(seed)
    # head_dim 16: the Triton decode kernel (test_cuda.py, and interpreted below) wants a power of 2
    model = Llama(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def serve(engine, contexts, n=1, max_new_tokens=5, **kw):
    out = [None] * len(contexts)

    def done(req, comps):
        out[req.tag] = [c.tokens for c in comps]

    stats = engine.run([Request(list(c), n, max_new_tokens, seed=1, path=(i,), on_done=done,
                                tag=i, **kw) for i, c in enumerate(contexts)])
    return out, stats


def test_requests_reuse_cached_prefixes_at_every_depth(model):
    rng = random.Random(0)
    stem = [rng.randrange(97) for _ in range(37)]  # 2 full blocks of 16 and 5 tokens
    a = stem + [rng.randrange(97) for _ in range(13)]  # 50 tokens
    b = stem + [rng.randrange(97) for _ in range(4)]  # shares 37 with a
    c = a[:20] + [rng.randrange(97) for _ in range(3)]  # shares 20 with a and b
    eng = Engine(model, eos_token_ids=[], progress=False)
    ref = Engine(model, eos_token_ids=[], prefix_reuse=False, progress=False)

    # one call: b and c share a block more with a than the (empty) index holds: they wait a
    # step, then find a's prefix cached; only what follows it is prefilled
    out, st = serve(eng, [a, b, c])
    assert out == serve(ref, [a, b, c])[0]
    assert st["prefill_calls"] == 2
    assert st["prefill_tokens"] == 50 + (41 - 37) + (23 - 20)
    assert st["context_tokens"] == 50 + 41 + 23

    # a finished reply is cached with its context (but its last token, never fed back): a
    # request extending a's reply, submitted when a ends, computes 1 + 2 tokens; a again, only
    # its last token
    got = {}

    def done(req, comps):
        got[req.tag] = comps[0].tokens
        if req.tag == "a":
            eng.submit(Request(a + comps[0].tokens + [5, 6], 1, 5, seed=1, path=(3,),
                               on_done=done, tag="d"))
            eng.submit(Request(a, 1, 5, seed=1, path=(0,), on_done=done, tag="a again"))

    st = eng.run([Request(a, 1, 5, seed=1, path=(0,), on_done=done, tag="a")])
    assert got["a"] == got["a again"] == out[0][0]
    d = a + out[0][0] + [5, 6]
    assert got["d"] == serve(ref, [d, d, d, d])[0][3][0]  # path (3,), as d's
    assert st["prefill_tokens"] == 50 + 3 + 1 and st["context_tokens"] == 50 + len(d) + 50
    assert eng.cache.held_blocks == 0

    # a new run starts from an empty index: its outputs depend on its own requests only
    st = serve(eng, [a])[1]
    assert st["prefill_tokens"] == 50


def test_n_branches_and_partial_blocks_equal_no_reuse(model):
    """Sampled branches fork one prefilled row; contexts cut inside blocks at random depths."""
    rng = random.Random(1)
    base = [rng.randrange(97) for _ in range(70)]
    contexts = [base[:rng.randrange(2, 70)]
                + [rng.randrange(97) for _ in range(rng.randrange(1, 9))] for _ in range(12)]
    kw = dict(n=3, max_new_tokens=6)
    eng = Engine(model, eos_token_ids=[], progress=False, max_batch=8)
    out, st = serve(eng, contexts, **kw)
    ref_out, ref_st = serve(Engine(model, eos_token_ids=[], prefix_reuse=False, progress=False,
                                   max_batch=8), contexts, **kw)
    assert out == ref_out
    assert st["context_tokens"] == sum(map(len, contexts))
    assert ref_st["prefill_tokens"] == 3 * st["context_tokens"]
    assert st["prefill_tokens"] < 0.5 * st["context_tokens"]


def test_small_pool_evicts_and_stays_exact(model):
    """A pool too small to keep every prefix: idle blocks are evicted, nothing held is."""
    rng = random.Random(2)
    stems = [[rng.randrange(97) for _ in range(40)] for _ in range(6)]
    contexts = [s + [rng.randrange(97) for _ in range(rng.randrange(1, 20))]
                for s in stems for _ in range(3)]
    rng.shuffle(contexts)
    eng = Engine(model, eos_token_ids=[], progress=False, cache_tokens=16 * 24, max_batch=4)
    out, st = serve(eng, contexts, max_new_tokens=8)
    assert out == serve(Engine(model, eos_token_ids=[], prefix_reuse=False, progress=False),
                        contexts, max_new_tokens=8)[0]
    # the pool filled up with cached prefixes and was evicted from; held blocks peak lower
    assert eng.cache.used_blocks == 24 and eng.cache.held_blocks == 0
    assert eng.cache.evicted > 0 and st["peak_cache_blocks"] < 24
    assert st["prefill_tokens"] < st["context_tokens"]


def with_adapters(ranks=(3, 5, 7), seed=0):
    """The tiny model with three random adapters of odd ranks (B nonzero: real updates)."""
    from malt_fast.model.lora import LoRAConfig, add_adapter, set_adapter

    model = tiny_model(seed)
    torch.manual_seed(seed + 1)
    for name, r in zip(("generator", "verifier", "refiner"), ranks):
        add_adapter(model, name, LoRAConfig(rank=r, alpha=2.0 * r))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    set_adapter(model, None)
    return model


def test_multi_adapter_engine_equals_per_role_merged_engines():
    """Rows of three adapters and the bare base decode in the same steps; each request's greedy
    tokens equal its role's merged-weights engine's, in fp32."""
    from malt_fast.model.lora import MultiAdapterView, merged_model

    model = with_adapters()
    names = [None, "generator", "verifier", "refiner"]
    rng = random.Random(3)
    stem = [rng.randrange(97) for _ in range(30)]
    contexts = [stem[:rng.randrange(1, 30)]
                + [rng.randrange(97) for _ in range(rng.randrange(1, 12))] for _ in range(16)]
    roles = [names[i % 4] for i in range(16)]
    multi = Engine(MultiAdapterView(model, names), eos_token_ids=[], progress=False, max_batch=8)
    got = [None] * 16

    def done(req, comps):
        got[req.tag] = [c.tokens for c in comps]

    st = multi.run([Request(c, 2, 7, seed=1, path=(i,), on_done=done, tag=i, adapter=r)
                    for i, (c, r) in enumerate(zip(contexts, roles))])
    for name in names:
        eng = Engine(merged_model(model, name), eos_token_ids=[], progress=False)
        idx = [i for i in range(16) if roles[i] == name]
        want, _ = serve(eng, [contexts[i] for i in idx], max_new_tokens=7, n=2)
        assert [got[i] for i in idx] == want, name
    assert st["context_tokens"] == sum(map(len, contexts))
    assert st["prefill_tokens"] < st["context_tokens"]  # the stem, once per weight set
    # the adapters really differ: the same context decodes differently under each
    same = Engine(MultiAdapterView(model, names), eos_token_ids=[], progress=False)
    outs = [None] * 4

    def done_same(req, comps):
        outs[req.tag] = comps[0].tokens

    same.run([Request(contexts[0], 1, 7, on_done=done_same, tag=i, adapter=n)
              for i, n in enumerate(names)])
    assert len({tuple(o) for o in outs}) == 4


def test_two_weight_sets_interleaved_share_prefixes_only_with_their_own():
    from malt_fast.model.lora import MultiAdapterView

    model = with_adapters()
    rng = random.Random(4)
    a = [rng.randrange(97) for _ in range(40)]  # 2 full blocks + 8
    b = a[:33] + [rng.randrange(97) for _ in range(5)]  # 38, shares 33 with a
    eng = Engine(MultiAdapterView(model, ["generator", "verifier"]), eos_token_ids=[],
                 progress=False)
    out = [None] * 4

    def done(req, comps):
        out[req.tag] = comps[0].tokens

    reqs = [(a, "generator"), (a, "verifier"), (b, "generator"), (b, "verifier")]
    st = eng.run([Request(c, 1, 5, seed=1, path=(i,), on_done=done, tag=i, adapter=w)
                  for i, (c, w) in enumerate(reqs)])
    # a is prefilled once per weight set; each b reuses 33 tokens of its own weights' a
    assert st["prefill_calls"] == 2
    assert st["prefill_tokens"] == 2 * 40 + 2 * (38 - 33)
    ref = Engine(MultiAdapterView(model, ["generator", "verifier"]), eos_token_ids=[],
                 prefix_reuse=False, progress=False)
    want = [None] * 4

    def done_ref(req, comps):
        want[req.tag] = comps[0].tokens

    ref.run([Request(c, 1, 5, seed=1, path=(i,), on_done=done_ref, tag=i, adapter=w)
             for i, (c, w) in enumerate(reqs)])
    assert out == want and out[0] != out[1]


def check_multi_adapter_engine(model, backend, graphs, count=8, budget=6):
    """Rows of three adapters and the base in one engine with the grouped-LoRA `backend` and the
    Triton decode kernel (fixed-shape steps; captured on CUDA): each greedy row equals its
    role's merged-weights engine."""
    from malt_fast.model.lora import MultiAdapterView, merged_model

    names = [None, "generator", "verifier", "refiner"]
    rng = random.Random(5)
    stem = [rng.randrange(97) for _ in range(30)]
    contexts = [stem[:rng.randrange(1, 30)] + [rng.randrange(97) for _ in range(5)]
                for _ in range(count)]
    roles = [names[i % 4] for i in range(count)]
    eng = Engine(MultiAdapterView(model, names, backend=backend), eos_token_ids=[],
                 progress=False, max_batch=16, decode_backend="triton", cuda_graphs=graphs)
    got = [None] * count

    def done(req, comps):
        got[req.tag] = comps[0].tokens

    eng.run([Request(c, 1, budget, on_done=done, tag=i, adapter=r)
             for i, (c, r) in enumerate(zip(contexts, roles))])
    for name in names:
        ref = Engine(merged_model(model, name), eos_token_ids=[], progress=False,
                     cuda_graphs=False)
        idx = [i for i in range(count) if roles[i] == name]
        want = ref.generate([contexts[i] for i in idx], max_new_tokens=budget)
        assert [got[i] for i in idx] == [w[0] for w in want], name
    return eng


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors need TRITON_INTERPRET=1")
def test_multi_adapter_engine_with_triton_kernels_interpreted():
    """The CUDA path's kernels (grouped LoRA, decode attention, fixed-shape steps) run on the
    CPU under the interpreter: the same tokens as per-role merged engines."""
    check_multi_adapter_engine(with_adapters(), "triton", graphs=True)
