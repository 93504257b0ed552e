"""The verifier's verdict: parsed from critique-like text, and scored from per-token probes at
the verdict word (SmolLM2's tokenizer)."""

import pytest

from malt_fast.malt.verdict import (VERDICT_MARKER, extract_verdict, verdict_probe_ids,
                                    verdict_score)

CRITIQUE = ("The solution adds 5 and 3 to get 8, which matches the question.\n"
            "Step 2 multiplies by 2 correctly.\n\n")


@pytest.mark.parametrize("text,want", [
    (CRITIQUE + "Verdict: correct", "correct"),
    (CRITIQUE + "Verdict: incorrect", "incorrect"),
    (CRITIQUE + "Verdict: Incorrect.", "incorrect"),
    (CRITIQUE + "VERDICT: CORRECT", "correct"),
    (CRITIQUE + "verdict: correct!", "correct"),
    (CRITIQUE + "**Verdict:** Incorrect", "incorrect"),
    (CRITIQUE + "**Verdict: incorrect**", "incorrect"),
    (CRITIQUE + "**Verdict**: correct", "correct"),
    (CRITIQUE + "Verdict: **Correct**", "correct"),
    (CRITIQUE + "Verdict: *correct*.", "correct"),
    (CRITIQUE + "Final verdict: wrong", "incorrect"),
    (CRITIQUE + "Verdict: right", "correct"),
    (CRITIQUE + "Verdict:\nincorrect", "incorrect"),
    # the verdict line need not be the last line
    (CRITIQUE + "Verdict: incorrect\n\nThe total should be 16, not 8.", "incorrect"),
    # repeated: the last marker wins, also over a quoted format earlier on
    ("I must end with 'Verdict: correct' or 'Verdict: incorrect'.\n" + CRITIQUE
     + "Verdict: correct\nOn second thought, step 2 is wrong.\nVerdict: incorrect", "incorrect"),
    (CRITIQUE + "Verdict: incorrect\nWait, I misread.\n**Verdict:** Correct", "correct"),
])
def test_extract_verdict(text, want):
    assert extract_verdict(text) == want


@pytest.mark.parametrize("text", [
    CRITIQUE,  # no marker
    "",
    CRITIQUE + "The verdict is correct",  # no "Verdict:" marker
    CRITIQUE + "Verdict: the answer is right",  # the word after the marker is neither
    CRITIQUE + "Verdict: correctly solved",
    CRITIQUE + "Verdict:",
    CRITIQUE + "Verdict: correct\nVerdict: unsure",  # the last marker decides
    CRITIQUE + "Overdict: correct",
])
def test_extract_verdict_none(text):
    assert extract_verdict(text) is None


@pytest.mark.parametrize("text", [CRITIQUE + "Verdict: correct", CRITIQUE + "**Verdict:** Wrong",
                                  CRITIQUE + "Verdict: the answer is right",
                                  CRITIQUE + "Verdict: correctly solved", CRITIQUE + "Verdict:",
                                  CRITIQUE + "Verdict: correct\nVerdict: unsure", CRITIQUE])
def test_the_rollout_appends_a_verdict_line_exactly_where_none_is_read(tok, text):
    """The pipeline's layout asks the rollout for a verdict line where extract_verdict reads
    none, so every critique it keeps ends up with a verdict its reader takes."""
    from malt_fast.malt.expand import role_layout
    from malt_fast.malt.prompts import load_prompts
    from malt_fast.rollout.tree import Transcript

    layout = role_layout(load_prompts(None, "arith"))
    assert Transcript(tok, layout).needs_verdict(text) == (extract_verdict(text) is None)


def test_marker_constant():
    assert extract_verdict(f"{VERDICT_MARKER} incorrect") == "incorrect"


@pytest.fixture(scope="module")
def tok(smollm_gguf):
    from malt_fast.model.tokenizer import load_tokenizer

    return load_tokenizer(smollm_gguf)


def test_probe_ids_are_first_tokens_of_each_form(tok):
    flag, pas = verdict_probe_ids(tok)
    assert set(flag).isdisjoint(pas) and len(set(flag)) == len(flag) and len(set(pas)) == len(pas)
    for word in ("incorrect", " incorrect", "Incorrect", " Incorrect", " wrong", "Wrong"):
        assert tok.encode(word)[0] in flag
    for word in ("correct", " correct", "Correct", " Correct", " right", "Right"):
        assert tok.encode(word)[0] in pas
    # SmolLM2 writes " incorrect" and " correct" as single tokens
    assert tok.encode(" incorrect") == [flag[flag.index(tok.encode(" incorrect")[0])]]
    assert len(tok.encode(" correct")) == 1


def _probes(tokens, at, flag, pas, flag_p, pass_p):
    """Rows of small made-up values, and flag_p / pass_p spread over the ids at `at`."""
    rows = [tuple([0.01] * (len(flag) + len(pas))) for _ in tokens]
    rows[at] = tuple([flag_p / len(flag)] * len(flag) + [pass_p / len(pas)] * len(pas))
    return rows


def _word_at(tok, tokens, word):
    """Index of the last token whose text holds `word` (the verdict word's first token)."""
    return max(i for i, t in enumerate(tokens) if word in tok.decode([t]))


@pytest.mark.parametrize("verdict,word", [
    ("Verdict: incorrect", " incorrect"),
    ("**Verdict:** Incorrect", " Inc"),
    ("**Verdict: correct**", " correct"),
    ("Verdict: *correct*.", "correct"),
    ("Verdict: **Incorrect**", "In"),
])
def test_verdict_score_reads_the_verdict_word(tok, verdict, word):
    flag, pas = verdict_probe_ids(tok)
    tokens = tok.encode(CRITIQUE + verdict) + tok.eos_token_ids[:1]
    at = _word_at(tok, tokens, word)
    assert tokens[at] in flag + pas
    probes = _probes(tokens, at, flag, pas, 0.6, 0.2)
    assert verdict_score(tokens, probes, tok, flag, pas) == pytest.approx(0.75)
    # the last marker counts, not an earlier one
    earlier = tok.encode("Verdict: correct\n")
    shifted = [None] * len(earlier) + probes
    assert verdict_score(earlier + tokens, shifted, tok, flag, pas) == pytest.approx(0.75)


def test_verdict_score_none_cases(tok):
    flag, pas = verdict_probe_ids(tok)
    tokens = tok.encode(CRITIQUE + "Verdict: incorrect")
    at = len(tokens) - 1
    probes = _probes(tokens, at, flag, pas, 0.3, 0.1)
    assert verdict_score(tokens, probes, tok, flag, pas) == pytest.approx(0.75)
    assert verdict_score(tokens, None, tok, flag, pas) is None  # sampled without a probe
    no_marker = tok.encode(CRITIQUE + "So it is incorrect")
    assert verdict_score(no_marker, _probes(no_marker, len(no_marker) - 1, flag, pas, 0.3, 0.1),
                         tok, flag, pas) is None
    cut = probes[:at] + [None]  # a stop cut re-encoded the word's token
    assert verdict_score(tokens, cut, tok, flag, pas) is None
    other = tok.encode(CRITIQUE + "Verdict: unclear")  # a word in neither set
    assert verdict_score(other, _probes(other, len(other) - 1, flag, pas, 0.3, 0.1), tok, flag,
                         pas) is None
    zero = _probes(tokens, at, flag, pas, 0.0, 0.0)
    assert verdict_score(tokens, zero, tok, flag, pas) is None
    ends = tok.encode(CRITIQUE + "Verdict: ")  # the reply ended before the word
    assert verdict_score(ends, [(0.1,) * (len(flag) + len(pas))] * len(ends), tok, flag,
                         pas) is None
    with pytest.raises(ValueError):  # rows not of flag_ids + pass_ids
        verdict_score(tokens, [(0.5, 0.5)] * len(tokens), tok, flag, pas)
