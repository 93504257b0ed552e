"""Request.probe: each sampled token records its probe ids' temperature-1 probabilities from the
logits it was sampled from (equal to a separate full forward's), without changing any sample."""

import pytest
import torch

from malt_fast.malt.verdict import verdict_probe_ids
from malt_fast.rollout import Engine, LevelSampling, Request, RoleLayout, SamplingParams
from malt_fast.rollout import expand_generations, expand_tree

TEXTS = ["What is 7 times 8?", "Name a colour.", "Write one word about the sea."]
LAYOUT = RoleLayout(question="Solve: {question}", verifier="Is the answer above right?",
                    refiner="Write a corrected answer.")


@pytest.fixture(scope="module")
def smol(smollm_gguf):
    from malt_fast.model.checkpoint import load_model
    from malt_fast.model.tokenizer import load_tokenizer

    return load_model(smollm_gguf, torch.float32, "cpu"), load_tokenizer(smollm_gguf)


def run(eng, prompts, probes, n=2, budget=8, **kw):
    """Completions per prompt; prompt i samples under path (i,) with probe probes[i]."""
    out = [None] * len(prompts)

    def done(req, comps):
        out[req.path[0]] = comps

    eng.run([Request(p, n, budget, SamplingParams(0.7), seed=5, path=(i,), probe=pr,
                     on_done=done, **kw) for i, (p, pr) in enumerate(zip(prompts, probes))])
    return out


def full_forward_probs(model, context, tokens, probe):
    """softmax(fp32 logits)[probe] before each token, from one forward over the whole text."""
    with torch.inference_mode():
        logits = model(torch.tensor([context + tokens]))[0].float()
    return torch.softmax(logits[len(context) - 1:-1], dim=-1)[:, list(probe)]


def test_probes_equal_a_full_forward_and_leave_samples_alone(smol):
    model, tok = smol
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in TEXTS]
    eng = Engine(model, tok, progress=False)
    plain = run(eng, prompts, [()] * 3)
    flag, pas = verdict_probe_ids(tok)
    # probe the sampled tokens too, so some probabilities are large, not only near 0
    sampled = sorted({t for comps in plain for c in comps for t in c.tokens})[:24]
    probe = flag + pas + tuple(sampled)
    # a probe of another length in the same batch, and a row without one
    probes = [probe, probe[:3], ()]
    got = run(eng, prompts, probes)
    for prompt, pr, comps, ref in zip(prompts, probes, got, plain):
        assert [c.tokens for c in comps] == [c.tokens for c in ref]
        for c in comps:
            if not pr:
                assert c.probes is None
                continue
            assert len(c.probes) == len(c.tokens) and all(len(p) == len(pr) for p in c.probes)
            want = full_forward_probs(model, prompt, c.tokens, pr)
            torch.testing.assert_close(torch.tensor(c.probes), want, atol=1e-4, rtol=0)
    assert max(max(p) for c in got[0] for p in c.probes) > 0.2  # not just tiny values


def test_stop_cut_marks_reencoded_tokens(smol):
    model, tok = smol
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe the sea."}])
    eng = Engine(model, tok, progress=False)
    probe = sum(verdict_probe_ids(tok), ())
    full = run(eng, [prompt], [probe], n=1, budget=12)[0][0]
    # a stop string starting at a word's second letter: the word's token is re-encoded
    at, stop = _inside_a_token(tok, full.tokens)
    cut = run(eng, [prompt], [probe], n=1, budget=12, stop=(stop,))[0][0]
    assert cut.finish == "stop" and cut.tokens[:at] == full.tokens[:at]
    assert len(cut.probes) == len(cut.tokens) > at
    assert cut.tokens[at] != full.tokens[at]  # re-encoded, never sampled
    assert cut.probes[:at] == full.probes[:at]
    assert all(p is None for p in cut.probes[at:])
    # stop lines go through the same cut: one entry per returned token
    listing = tok.apply_chat_template([{"role": "user", "content": "List four fruits, one per "
                                                                  "line, numbered."}])
    lines = run(eng, [listing], [probe], n=2, budget=16, stop_line=("1.",))[0]
    assert any(c.finish == "stop" for c in lines)
    for c in lines:
        assert len(c.probes) == len(c.tokens) and None not in c.probes[:-1]


def _inside_a_token(tok, tokens):
    """(index of a token of 3+ letters, the text from its word's second letter on), such that
    the text first holds that string there."""
    text = tok.decode(tokens)
    for i in range(1, len(tokens)):
        piece = tok.decode([tokens[i]])
        word = piece.strip()
        if len(word) >= 3 and word.isalpha():
            start = len(tok.decode(tokens[:i])) + piece.index(word)
            if text.find(word[1:]) == start + 1:
                return i, word[1:]
    raise AssertionError(f"no word token to cut inside in {text!r}")


def test_tree_nodes_carry_probes_of_their_level(smol):
    model, tok = smol
    eng = Engine(model, tok, progress=False)
    flag, pas = verdict_probe_ids(tok)
    plain = LevelSampling(max_new_tokens=4, temperature=0.7)
    probed = LevelSampling(max_new_tokens=4, temperature=0.7, probe=flag + pas)
    sampling = {"generator": plain, "verifier": probed, "refiner": plain}
    trees, _ = expand_tree(eng, ["What is 2+3?"], LAYOUT, n=2, sampling=sampling, seed=1)
    gens = trees[0]["generations"]
    verifs = [v for g in gens for v in g["verifications"]]
    refs = [r for v in verifs for r in v["refinements"]]
    assert (len(gens), len(verifs), len(refs)) == (2, 4, 8)
    for v in verifs:
        assert len(v["probes"]) == len(v["tokens"])
        assert all(len(p) == len(flag + pas) for p in v["probes"])
    assert not any("probes" in node for node in gens + refs)
    # the first level alone passes it through too
    out, _ = expand_generations(eng, ["What is 2+3?"], LAYOUT, n=1, sampling=probed, seed=1)
    assert len(out[0][0]["probes"]) == len(out[0][0]["tokens"])


def test_appended_verdict_line_is_one_reply_scored_from_its_own_logits(smol):
    """A layout's verdict: a critique without the line gets "\\nVerdict:" and a sampled word,
    as one node whose tokens decode to its text; the word's probe equals a full fp32 forward
    over the verifier's context + the node's tokens; one engine and roles on separate engines
    give the same trees (greedy)."""
    from malt_fast.malt.verdict import extract_verdict, verdict_score, verdict_word_ids
    from malt_fast.rollout.tree import Transcript

    model, tok = smol
    layout = RoleLayout(question="Solve: {question}", verifier="Is the answer above right?",
                        refiner="Write a corrected answer.", verdict="Verdict:")
    flag, pas = verdict_probe_ids(tok)
    plain = LevelSampling(max_new_tokens=6, temperature=0.0)
    probed = LevelSampling(max_new_tokens=6, temperature=0.0, probe=flag + pas)
    words = verdict_word_ids(tok)
    sampling = {"generator": plain, "verifier": probed, "refiner": plain,
                "verdict": LevelSampling(temperature=0.0, probe=flag + pas,
                                         first_token_ids=words)}
    questions = ["What is 2+3?", "What is 9-4?"]
    eng = Engine(model, tok, progress=False)
    trees, _ = expand_tree(eng, questions, layout, n=2, sampling=sampling, seed=1)
    transcript = Transcript(tok, layout)
    scored = 0
    for q, t in zip(questions, trees):
        for g in t["generations"]:
            ctx = transcript.next_context(transcript.generator_context(q), g["tokens"], q,
                                          "verifier")
            for v in g["verifications"]:
                assert "\nVerdict:" in v["text"] and tok.decode(v["tokens"]) == v["text"]
                assert len(v["probes"]) == len(v["tokens"]) and len(v["refinements"]) == 2
                score = verdict_score(v["tokens"], v["probes"], tok, flag, pas)
                if score is None:
                    continue
                scored += 1
                # the word is drawn among the two verdicts (greedy: the likelier one)
                assert extract_verdict(v["text"]) == ("incorrect" if score > 0.5 else "correct")
                lead = tok.encode("\nVerdict:")
                at = max(i for i in range(len(v["tokens"]))
                         if v["tokens"][i:i + len(lead)] == lead) + len(lead)
                assert v["tokens"][at] in words and v["probes"][at] is not None
                want = full_forward_probs(model, ctx, v["tokens"], flag + pas)
                sampled = [i for i, p in enumerate(v["probes"]) if p is not None]
                torch.testing.assert_close(torch.tensor([v["probes"][i] for i in sampled]),
                                           want[sampled], atol=1e-4, rtol=0)
    assert scored == 8  # every critique: 2 questions x 2 generations x 2 critiques
    per_role = {"generator": eng, "verifier": Engine(model, tok, progress=False),
                "refiner": eng}
    again, _ = expand_tree(per_role, questions, layout, n=2, sampling=sampling, seed=1)

    def texts(ts):
        return [[(g["text"], [(v["text"], [r["text"] for r in v["refinements"]])
                  for v in g["verifications"]]) for g in t["generations"]] for t in ts]

    assert texts(again) == texts(trees)


def test_a_verdict_line_is_needed_unless_a_word_follows_the_marker(smol):
    from malt_fast.rollout.tree import Transcript

    _, tok = smol
    t = Transcript(tok, RoleLayout(verdict="Verdict:"))
    assert t.needs_verdict("The sum is right.")
    assert t.needs_verdict("The sum is right.\nVerdict:")  # the model stopped at the colon
    assert t.needs_verdict("Verdict: correct. But then\nverdict: **")
    assert not t.needs_verdict("The sum is right.\nVerdict: correct")
    assert not t.needs_verdict("**verdict:** Incorrect")
    assert not Transcript(tok, RoleLayout()).needs_verdict("no verdict asked for")
