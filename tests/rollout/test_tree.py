"""G→V→R expansion: tree shape, prefix reuse equals recomputation, transcript = chat template."""

import pytest
import torch

from malt_fast.rollout import Engine, LevelSampling, RoleLayout, expand_tree
from malt_fast.rollout.tree import Transcript

LAYOUT = RoleLayout(question="Solve: {question}", verifier="Check the answer above for {question}",
                    refiner="Write a corrected answer.", system="You are careful.")
QUESTIONS = ["What is 2+3?", "Tom has 5 apples and eats 2. How many are left?"]


@pytest.fixture(scope="module")
def smol(smollm_gguf):
    from malt_fast.model.checkpoint import load_model
    from malt_fast.model.tokenizer import load_tokenizer

    return load_model(smollm_gguf, torch.float32, "cpu"), load_tokenizer(smollm_gguf)


def texts(trees):
    return [[(g["text"], [(v["text"], [r["text"] for r in v["refinements"]])
              for v in g["verifications"]]) for g in t["generations"]] for t in trees]


def test_sampled_tree_shape_and_branches(smol):
    model, tok = smol
    eng = Engine(model, tok, progress=False)
    sampling = LevelSampling(max_new_tokens=5, temperature=1.0)
    trees, stats = expand_tree(eng, QUESTIONS, LAYOUT, n=3, sampling=sampling, seed=3)
    assert [t["question"] for t in trees] == QUESTIONS
    for t in trees:
        gens = t["generations"]
        verifs = [v for g in gens for v in g["verifications"]]
        refs = [r for v in verifs for r in v["refinements"]]
        assert (len(gens), len(verifs), len(refs)) == (3, 9, 27)
        for node in gens + verifs + refs:
            assert 1 <= len(node["tokens"]) <= 5 and node["text"] == tok.decode(node["tokens"])
        assert len({tuple(r["tokens"]) for r in refs}) > 3  # branches sample independently
    assert stats["generated_tokens"] == sum(len(n["tokens"]) for t in trees
                                            for n in _nodes(t))
    again, _ = expand_tree(eng, QUESTIONS, LAYOUT, n=3, sampling=sampling, seed=3)
    assert again == trees
    assert eng.cache.held_blocks == 0  # every kept sequence was handed on and released


def _nodes(tree):
    for g in tree["generations"]:
        yield g
        for v in g["verifications"]:
            yield v
            yield from v["refinements"]


def test_prefix_reuse_equals_recomputation_and_saves_prefill(smol):
    model, tok = smol
    sampling = LevelSampling(max_new_tokens=4, temperature=0.0)
    runs = {}
    for reuse in (True, False):
        eng = Engine(model, tok, prefix_reuse=reuse, progress=False)
        runs[reuse] = expand_tree(eng, QUESTIONS, LAYOUT, n=3, sampling=sampling)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1]["prefill_tokens"] <= 0.35 * runs[False][1]["prefill_tokens"]
    # roles on separate engines (as with different weights) share prefixes within a role only
    # (here greedy siblings are equal, so a role reuses all but their last context token)
    per_role = {r: Engine(model, tok, progress=False) for r in ("generator", "verifier",
                                                                "refiner")}
    trees, stats = expand_tree(per_role, QUESTIONS, LAYOUT, n=3, sampling=sampling)
    assert texts(trees) == texts(runs[True][0])
    assert stats["prefill_tokens"] < 0.35 * stats["context_tokens"]
    assert stats["context_tokens"] < runs[False][1]["prefill_tokens"]


def test_transcript_matches_chat_template(smol):
    _, tok = smol
    tr = Transcript(tok, LAYOUT)
    q, g, v = QUESTIONS[1], "There are 3 apples left.", "The answer is right."
    msgs = [{"role": "system", "content": "You are careful."},
            {"role": "user", "content": "Solve: " + q}]
    gen_ctx = tr.generator_context(q)
    assert gen_ctx == tok.apply_chat_template(msgs)
    eos = tok.eos_token_ids[0]
    ver_ctx = tr.next_context(gen_ctx, tok.encode(g) + [eos], q, "verifier")
    msgs += [{"role": "assistant", "content": g},
             {"role": "user", "content": "Check the answer above for " + q}]
    assert ver_ctx == tok.apply_chat_template(msgs)
    # a reply cut by the budget has no EOS; the template still closes the turn
    ref_ctx = tr.next_context(ver_ctx, tok.encode(v), q, "refiner")
    msgs += [{"role": "assistant", "content": v},
             {"role": "user", "content": "Write a corrected answer."}]
    assert ref_ctx == tok.apply_chat_template(msgs)


def test_stop_strings_in_tree_keep_cache_consistent(smol):
    """A reply cut inside a token must leave the cache holding exactly the returned tokens'
    prefix, so children decode the same with and without reuse."""
    model, tok = smol
    sampling = LevelSampling(max_new_tokens=6, temperature=0.0, stop=("e",))
    runs = []
    for reuse in (True, False):
        eng = Engine(model, tok, prefix_reuse=reuse, progress=False)
        runs.append(expand_tree(eng, QUESTIONS[:1], LAYOUT, n=2, sampling=sampling)[0])
        assert eng.cache.held_blocks == 0
    assert runs[0] == runs[1]
    nodes = list(_nodes(runs[0][0]))
    assert any(n["finish"] == "stop" for n in nodes)
    for n in nodes:
        assert "e" not in n["text"] and tok.decode(n["tokens"]) == n["text"]


def test_per_question_keys_sample_as_separate_calls(smol):
    """Two seeds' questions in one call, each with its (seed, index) key, give what one call per
    seed gives (the evaluation batches its seeds this way); on trained roles too, through one
    multi-adapter engine against per-role merged engines."""
    from malt_fast.model.lora import LoRAConfig, MultiAdapterView, add_adapter, merged_model
    from malt_fast.model.lora import set_adapter

    model, tok = smol
    sampling = LevelSampling(max_new_tokens=5, temperature=1.0)
    eng = Engine(model, tok, progress=False)
    seeds = {3: QUESTIONS, 8: QUESTIONS[::-1] + QUESTIONS[:1]}
    alone = {s: expand_tree(eng, qs, LAYOUT, n=1, sampling=sampling, seed=s)[0]
             for s, qs in seeds.items()}
    questions = [q for qs in seeds.values() for q in qs]
    keys = [(s, i) for s, qs in seeds.items() for i in range(len(qs))]
    together, _ = expand_tree(eng, questions, LAYOUT, n=1, sampling=sampling, seed=keys)
    assert together == alone[3] + alone[8]
    assert alone[3][0] != alone[8][2]  # the same question under another seed samples otherwise

    # trained roles: small random adapters (B nonzero) on a copy of the weights. Base GEMM +
    # LoRA delta equals merged weights only in exact arithmetic, and each CPU kind rounds the two
    # differently, so these paths are compared greedily (a sampled token can flip on one CPU).
    greedy = LevelSampling(max_new_tokens=5, temperature=0.0)
    roles = ("generator", "verifier", "refiner")
    tuned = merged_model(model, None)
    torch.manual_seed(0)
    for r in roles:
        add_adapter(tuned, r, LoRAConfig(rank=3, alpha=3.0))
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    set_adapter(tuned, None)
    multi = Engine(MultiAdapterView(tuned, [None, *roles]), tok, progress=False)
    got, _ = expand_tree({r: (multi, r) for r in roles}, questions, LAYOUT, n=1,
                         sampling=greedy, seed=keys)
    per_role = {r: Engine(merged_model(tuned, r), tok, progress=False) for r in roles}
    want = {s: texts(expand_tree(per_role, qs, LAYOUT, n=1, sampling=greedy, seed=s)[0])
            for s, qs in seeds.items()}
    assert texts(got) == want[3] + want[8]
    base, _ = expand_tree(eng, questions, LAYOUT, n=1, sampling=greedy, seed=keys)
    assert texts(got) != texts(base)  # the adapters change the replies


def test_refine_if_skips_refinements_and_keeps_the_rest(smol):
    """refine_if: critiques it rejects get no refinements; the others' refinements are the
    ones an unrestricted expansion samples (same paths), on one engine and per role."""
    model, tok = smol
    sampling = LevelSampling(max_new_tokens=4, temperature=0.0)
    eng = Engine(model, tok, progress=False)
    full, _ = expand_tree(eng, QUESTIONS, LAYOUT, n=2, sampling=sampling, seed=2)
    critiques = sorted({v["text"] for t in full for g in t["generations"]
                        for v in g["verifications"]})
    keep = set(critiques[::2])  # some critiques refined, some not
    assert keep and len(keep) < len(critiques)
    per_role = {"generator": eng, "verifier": eng, "refiner": Engine(model, tok, progress=False)}
    for engines in (eng, per_role):
        got, stats = expand_tree(engines, QUESTIONS, LAYOUT, n=2, sampling=sampling, seed=2,
                                 refine_if=lambda text: text in keep)
        for t_got, t_full in zip(got, full):
            for g_got, g_full in zip(t_got["generations"], t_full["generations"]):
                for v_got, v_full in zip(g_got["verifications"], g_full["verifications"]):
                    assert v_got["text"] == v_full["text"]
                    want = v_full["refinements"] if v_full["text"] in keep else []
                    assert [r["text"] for r in v_got["refinements"]] == \
                        [r["text"] for r in want]
    assert eng.cache.held_blocks == 0  # skipped critiques released their sequences
