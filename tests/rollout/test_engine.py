"""Engine.generate against transformers.generate, plus sampling, seeds, stop strings, cache limits."""

import pytest
import torch

from malt_fast.rollout import CacheFull, Engine
from malt_fast.rollout.sampling import BranchRandom, SamplingParams, sample

PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 17, list(range(50, 55)), [200]]


def tiny_llama(tmp_path_factory, device="cpu"):
    """A random tiny Llama (GQA, 3 layers, EOS 3) saved by transformers: (theirs, ours)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from malt_fast.model.checkpoint import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=3, bos_token_id=1, initializer_range=0.3)
    hf = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return hf.to(device), load_model(path, torch.float32, device)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def smol(smollm_gguf):
    """Our SmolLM2 (fp32), its tokenizer, and transformers' load of the same GGUF."""
    from transformers import AutoModelForCausalLM

    from malt_fast.model.checkpoint import load_model
    from malt_fast.model.tokenizer import load_tokenizer

    ours = load_model(smollm_gguf, torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name,
                                              dtype=torch.float32).eval()
    return ours, load_tokenizer(smollm_gguf), hf


def hf_greedy(hf, prompt, max_new_tokens, eos):
    """transformers' greedy continuation of one unpadded prompt."""
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                          dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("backend,max_batch", [("cpp", 64), ("torch", 64), ("cpp", 3)])
def test_greedy_matches_transformers_tiny(tiny, backend, max_batch):
    hf, ours = tiny
    eng = Engine(ours, None, block_size=4, cache_tokens=1024, max_batch=max_batch,
                 decode_backend=backend, progress=False)
    out = eng.generate(PROMPTS, n=2, max_new_tokens=24)
    for prompt, comps in zip(PROMPTS, out):
        ref = hf_greedy(hf, prompt, 24, [3])
        assert comps == [ref, ref]
    assert len({tok for c in out for tok in c[0]}) > 10  # the model is not degenerate
    st = eng.last_stats
    assert st["prefill_tokens"] == sum(map(len, PROMPTS))  # once per prompt, not per branch
    assert st["generated_tokens"] == sum(len(c) for cs in out for c in cs)
    assert eng.cache.held_blocks == 0 and st["peak_cache_blocks"] > 0


def test_greedy_matches_transformers_smollm2(smol):
    ours, tok, hf = smol
    texts = ["What is 7 times 8?", "Name three colours of the rainbow and explain where the "
             "rainbow comes from in two sentences.", "Hi"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    eng = Engine(ours, tok, progress=False)
    out = eng.generate(prompts, max_new_tokens=24)
    for prompt, comps in zip(prompts, out):
        assert comps[0] == hf_greedy(hf, prompt, 24, tok.eos_token_ids)


def test_stop_string_cuts_exactly(smol):
    ours, tok, _ = smol
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe the sea."}])
    eng = Engine(ours, tok, progress=False)
    full = tok.decode(eng.generate([prompt], max_new_tokens=20)[0][0])
    for stop in (full[7:10], full[12:13], "no such text", full[-4:]):
        cut = eng.generate([prompt], max_new_tokens=20, stop=[stop, "\x01never"])[0][0]
        expected = full[: full.find(stop)] if stop in full else full
        assert tok.decode(cut) == expected


def test_stop_line_ends_the_reply_with_the_markers_line(smol):
    """`stop_line`: the reply ends at the first line break after a marker (past any blank
    text right after it), the line break excluded; the ids decode to exactly that text."""
    from malt_fast.rollout.engine import Request

    ours, tok, _ = smol
    prompt = tok.apply_chat_template([{"role": "user", "content": "List four fruits, one per "
                                                                  "line, numbered."}])
    eng = Engine(ours, tok, progress=False)

    def reply(markers):
        got = []
        eng.run([Request(prompt, 1, 60, stop_line=markers,
                         on_done=lambda req, comps: got.extend(comps))])
        return got[0]

    full = reply(())
    text = tok.decode(full.tokens)
    lines = text.split("\n")
    assert len([ln for ln in lines if ln.strip()]) >= 3, text  # a multi-line reply to cut
    second = next(i for i, ln in enumerate(lines) if i and ln.strip())
    marker = lines[second].strip()[:4]
    at = text.find(marker)
    expected = text[:text.find("\n", at + len(marker))]
    for markers in ((marker,), ("\x01never", marker)):
        got = reply(markers)
        assert got.finish == "stop" and got.text == expected and tok.decode(got.tokens) == expected
    assert reply(("\x01never",)).tokens == full.tokens
    # a marker ending its line: the reply runs on to the next line with text in it
    end_of_line = lines[second][-3:]
    got = reply((end_of_line,))
    nxt = next(i for i in range(second + 1, len(lines)) if lines[i].strip())
    assert got.text == "\n".join(lines[:nxt + 1])


def test_seeds_reproduce_and_differ(tiny):
    _, ours = tiny
    eng = Engine(ours, None, block_size=4, progress=False)
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = eng.generate(PROMPTS[:2], seed=1, **kw)
    assert eng.generate(PROMPTS[:2], seed=1, **kw) == a
    assert eng.generate(PROMPTS[:2], seed=2, **kw) != a
    assert len({tuple(c) for c in a[0]}) == 3  # sibling branches draw different streams


def test_top_k_one_is_greedy(tiny):
    _, ours = tiny
    eng = Engine(ours, None, block_size=4, progress=False)
    greedy = eng.generate(PROMPTS, max_new_tokens=12)
    assert eng.generate(PROMPTS, max_new_tokens=12, temperature=2.0, top_k=1, seed=5) == greedy


def test_sampling_follows_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 6000
    logits = probs.log().expand(rows, -1)
    gens = [BranchRandom(torch.Generator().manual_seed(i)) for i in range(rows)]
    for params, expected in [(SamplingParams(1.0), probs),
                             (SamplingParams(1.0, top_p=0.7), torch.tensor([0.625, .375, 0, 0])),
                             (SamplingParams(1.0, top_k=3), torch.tensor([.5, .3, .15, 0]) / .95),
                             (SamplingParams(0.5), probs**2 / (probs**2).sum())]:
        picks = sample(logits, [params] * rows, gens)
        freq = torch.bincount(picks, minlength=4).float() / rows
        torch.testing.assert_close(freq, expected.float(), atol=0.025, rtol=0)


def test_small_cache_queues_and_stays_exact(tiny):
    hf, ours = tiny
    # room for about one request at a time: the others must wait, not fail or corrupt
    eng = Engine(ours, None, block_size=4, cache_tokens=4 * 24, progress=False)
    out = eng.generate(PROMPTS[:4], n=2, max_new_tokens=12)
    for prompt, comps in zip(PROMPTS[:4], out):
        ref = hf_greedy(hf, prompt, 12, [3])
        assert comps == [ref, ref]


def test_request_larger_than_cache_names_the_size(tiny):
    _, ours = tiny
    eng = Engine(ours, None, block_size=4, cache_tokens=32, progress=False)
    with pytest.raises(CacheFull, match=r"needs up to \d+ blocks of 4, the cache has 8"):
        eng.generate([list(range(10, 40))], n=2, max_new_tokens=30)


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["fixed-shape", "eager"])
def test_greedy_with_triton_cascade_backend(tiny, cuda_graphs):
    """The Triton kernel (interpreted on CPU) inside the engine: forked branches share blocks.
    With cuda_graphs the steps run padded to a bucket (6 rows -> 8) through fixed buffers, the
    path a CUDA graph replays; on CPU it runs eagerly."""
    hf, ours = tiny
    eng = Engine(ours, None, block_size=16, decode_backend="triton", progress=False,
                 max_batch=8, cuda_graphs=cuda_graphs)
    assert (eng.graphs is not None) == cuda_graphs
    out = eng.generate(PROMPTS[1:3] + PROMPTS[:1], n=2, max_new_tokens=8)
    for prompt, comps in zip(PROMPTS[1:3] + PROMPTS[:1], out):
        ref = hf_greedy(hf, prompt, 8, [3])
        assert comps == [ref, ref]
    if cuda_graphs:  # at most 6 branches ran at once: bucket 8 means padding rows were used
        assert 8 in eng.cache._static


def test_fixed_shape_sampling_equals_eager(tiny):
    """Sampled tokens from the fixed-shape steps equal the eager steps' (same seeds), with
    branches forked at 16-token block boundaries so the cascade items are in play, and 6
    branches padded to a step of 8 rows."""
    _, ours = tiny
    prompts = [list(range(10, 42)), list(range(60, 77))]
    runs = []
    for graphs in (True, False):
        eng = Engine(ours, None, block_size=16, decode_backend="triton", progress=False,
                     max_batch=8, cuda_graphs=graphs)
        runs.append(eng.generate(prompts, n=3, max_new_tokens=6, temperature=0.8, seed=4))
        if graphs:
            assert 8 in eng.cache._static
    assert runs[0] == runs[1]


def test_one_token_budget_and_first_token_eos(tiny):
    hf, ours = tiny
    eng = Engine(ours, None, block_size=4, progress=False)
    assert eng.generate(PROMPTS, max_new_tokens=1) == [[hf_greedy(hf, p, 1, [3])]
                                                       for p in PROMPTS]
    # make every first token an EOS: the branch must end at once with just that token
    first = [hf_greedy(hf, p, 1, [3])[0] for p in PROMPTS]
    eng_eos = Engine(ours, None, block_size=4, progress=False, eos_token_ids=first)
    assert eng_eos.generate(PROMPTS, n=2, max_new_tokens=5) == [[[t], [t]] for t in first]
    assert eng_eos.cache.held_blocks == 0


def test_branch_stream_is_the_generators_sequence():
    """Uniforms drawn 64 at a time are exactly those of one torch.rand call per draw."""
    from malt_fast.rollout.sampling import branch_generator

    stream, twin = branch_generator(5, 1, 2), branch_generator(5, 1, 2)
    one_by_one = [torch.rand((), generator=twin.generator).item() for _ in range(150)]
    assert [stream.uniform() for _ in range(150)] == one_by_one
    assert branch_generator(5, 1, 3).uniform() != one_by_one[0]


def test_mixed_greedy_and_sampled_rows_in_one_batch():
    """A step mixes requests: temperature-0 rows take the argmax and draw no uniform, the
    others sample (here under top-k 1, so also the argmax) or follow their own stream."""
    torch.manual_seed(3)
    logits = torch.randn(6, 50)
    params = [SamplingParams(0.0), SamplingParams(1.0, top_k=1), SamplingParams(0.0),
              SamplingParams(0.7), SamplingParams(1.0, top_p=0.5), SamplingParams(0.0)]
    streams = [BranchRandom(torch.Generator().manual_seed(i)) for i in range(6)]
    picks = sample(logits, params, streams)
    best = logits.argmax(-1)
    assert picks[[0, 1, 2, 5]].tolist() == best[[0, 1, 2, 5]].tolist()
    # greedy rows left their streams untouched; sampling rows drew exactly one uniform
    fresh = [BranchRandom(torch.Generator().manual_seed(i)) for i in range(6)]
    assert streams[0].uniform() == fresh[0].uniform()
    fresh[3].uniform()
    assert streams[3].uniform() == fresh[3].uniform()
    # row 3 alone, sampled the same way, gives the same token
    alone = sample(logits[3:4], [params[3]], [BranchRandom(torch.Generator().manual_seed(3))])
    assert alone.tolist() == picks[3:4].tolist()


def test_greedy_with_fused_layer_ops(tiny, monkeypatch):
    """The fused RMSNorm/RoPE/SiLU-mul kernels the model uses on CUDA (interpreted here) keep
    the engine's greedy output equal to transformers', prefill and decode; training (grad
    enabled) keeps the torch ops."""
    from malt_fast.kernels import layer_ops
    from malt_fast.model import llama

    hf, ours = tiny
    used = []

    def fused(x):
        used.append(not torch.is_grad_enabled())
        return layer_ops if used[-1] else None

    monkeypatch.setattr(llama, "fused_ops", fused)
    eng = Engine(ours, None, block_size=4, progress=False)
    out = eng.generate(PROMPTS[:3], n=2, max_new_tokens=10)
    for prompt, comps in zip(PROMPTS[:3], out):
        ref = hf_greedy(hf, prompt, 10, [3])
        assert comps == [ref, ref]
    assert used and all(used)
    ids = torch.tensor([PROMPTS[1]])
    logits = ours(ids)
    assert not used[-1] and logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), logits.detach(), rtol=1e-4, atol=1e-4)
    assert used[-1]


def test_progress_bar_ends_at_its_total(tiny):
    """The bar's total starts at the budgets and drops by what each branch left unused, so it
    ends at 100%: the tokens sampled. Every other id is an EOS here, so most branches end
    well before their budget."""
    from malt_fast.rollout.engine import Request

    _, ours = tiny
    eos = list(range(0, ours.config.vocab_size, 2))
    eng = Engine(ours, None, block_size=4, progress=True, eos_token_ids=eos)
    stats = eng.run([Request(list(p), 3, 12, SamplingParams(1.0), seed=3, path=(i,))
                     for i, p in enumerate(PROMPTS[:3])])
    assert stats["generated_tokens"] < 3 * 3 * 12 // 2
    assert eng._bar.n == eng._bar.total == stats["generated_tokens"]
