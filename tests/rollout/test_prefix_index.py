"""The engine's prefix index: requests start from the longest prefix cached with their weights;
outputs equal an engine without reuse, and the prefill counts are exact."""

import random

import pytest
import torch

from malt_fast.model.llama import Llama, LlamaConfig
from malt_fast.rollout import Engine
from malt_fast.rollout.engine import Request


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96,
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
    # request extending a's reply computes 1 + 2 tokens; a itself computes only its last one
    d = a + out[0][0] + [5, 6]
    out2, st = serve(eng, [d, a])
    assert out2 == serve(ref, [d, a])[0] and out2[1] == out[0]
    assert st["prefill_tokens"] == 3 + 1 and st["context_tokens"] == len(d) + 50
    assert eng.cache.held_blocks == 0


def test_n_branches_and_partial_blocks_equal_no_reuse(model):
    """Sampled branches fork one prefilled row; contexts cut inside blocks at random depths."""
    rng = random.Random(1)
    base = [rng.randrange(97) for _ in range(70)]
    contexts = [base[:rng.randrange(2, 70)] + [rng.randrange(97) for _ in range(rng.randrange(1, 9))]
                for _ in range(12)]
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
    assert st["peak_cache_blocks"] == 24  # the pool filled up and was evicted from
    assert st["prefill_tokens"] < st["context_tokens"]
    assert eng.cache.held_blocks == 0
