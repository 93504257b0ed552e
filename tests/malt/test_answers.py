"""Answer extraction T and equivalence: packaged golds, tricky LaTeX, model-style text, CSQA,
and untrusted input."""

import time
from fractions import Fraction

import pytest

from malt_fast.data import load_dataset
from malt_fast.malt.answers import (answer_family, answers_equal, extract_answer, is_correct,
                                    math_equal, normalize_math, reward)


@pytest.fixture(scope="module")
def math_golds():
    return [e.gold for e in load_dataset("math", "train") + load_dataset("math", "test")]


def test_every_gsm8k_gold_roundtrips():
    rows = load_dataset("gsm8k", "train") + load_dataset("gsm8k", "test")
    assert len(rows) == 8792
    for e in rows:
        for text in (f"So she has {e.gold} left.", f"Step 1.\nFinal Answer: {e.gold}",
                     f"The answer is ${e.gold}."):
            assert is_correct(text, e.gold, "gsm8k"), (text, e.gold)
        # and the check can fail: one more is wrong
        assert not is_correct(f"Final Answer: {Fraction(e.gold) + 1}", e.gold, "gsm8k")


def test_every_math_gold_roundtrips(math_golds):
    # 12,500 rows, less the two train solutions whose \boxed{} is empty (the loader drops them)
    assert len(math_golds) == 12498
    for gold in math_golds:
        one_line = gold.replace("\n", " ")  # one gold spans two lines; a Final Answer line cannot
        for text in (f"Thus the answer is \\boxed{{{gold}}}.",
                     f"Steps.\nFinal Answer: ${one_line}$"):
            answer = extract_answer(text, "math")
            assert answer is not None and math_equal(answer, gold), (text, answer)
        assert not math_equal(gold, "{" + gold + "}+1"), gold


def test_math_golds_mostly_reach_the_symbolic_checker(math_golds):
    # The string path makes self-equality trivial; this checks the restricted parser really
    # covers the dataset's answers. Measured: 93 of 12,174 non-word golds do not parse (base-n
    # numerals like 1011_2, ratios 3:1, \pm, inequalities): these are compared as strings.
    from malt_fast.malt.answers import _structure, _struct_equal, _Unparsable, _wordy

    parsed = failed_self = 0
    for gold in math_golds:
        norm = normalize_math(gold)
        if _wordy(norm):
            continue
        try:
            st = _structure(norm, 0)
        except _Unparsable:
            continue
        parsed += 1
        failed_self += not _struct_equal(st, st)
    assert parsed >= 12000
    assert failed_self == 0


@pytest.mark.parametrize("a,b,equal", [
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\tfrac12", "\\frac{1}{2}", True),
    ("0.5", "\\frac12", True),
    ("\\frac 92", "4.5", True),
    ("10\\%", "10", True),
    ("8\\text{ cm}", "8", True),
    ("32\\text{ square cm}^2", "32", True),
    ("20 square units", "20", True),
    ("\\sqrt2", "\\sqrt{2}", True),
    ("2\\sqrt{65}", "\\sqrt{260}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("(1,2]", "(1,2)", False),
    ("(1,2]", "(1, 2]", True),
    ("[1,2)", "(1,2)", False),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("(-\\infty, 2)", "(\\infty, 2)", False),
    ("180^\\circ", "180", True),
    ("30^{\\circ}", "30 degrees", True),
    ("\\$1,\\!000", "1000", True),
    ("x = 5", "5", True),
    ("\\sqrt{5}, -\\sqrt{5}", "-\\sqrt{5}, \\sqrt{5}", True),
    ("(1, 2)", "(2, 1)", False),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x+1", "(x-1)^2", False),
    ("\\frac{\\pi}{4}", "\\pi/4", True),
    ("\\pi r^2", "r^2\\pi", True),
    ("2^{10}", "1024", True),
    ("1000000001", "1000000000", False),
    ("\\text{odd}", "odd", True),
    ("\\text{odd}", "dod", False),
    ("\\text{(C)}", "C", True),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\-2\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix}-2\\\\1\\end{pmatrix}", False),
    ("\\frac{1}{3}", "0.333", False),
    ("1+3i", "3i+1", True),
])
def test_math_equivalence(a, b, equal):
    assert math_equal(a, b) is equal
    assert math_equal(b, a) is equal


def test_nested_boxes_take_the_outer_last_box():
    text = "First \\boxed{1}. Then \\boxed{\\frac{\\sqrt{\\boxed{2}}}{2}} is it."
    assert extract_answer(text, "math") == "\\frac{\\sqrt{\\boxed{2}}}{2}"
    assert is_correct("So \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", "math")


@pytest.mark.parametrize("text,expected", [
    ("The answer is $1,000.00.", "1000"),
    ("She pays 3 * $12 = $36.\nFinal Answer: $36", "36"),
    ("Final Answer: 18 - 5 = 13", "13"),
    ("Final Answer: 13 apples (since 18 - 5 = 13)", "13"),
    ("**Final Answer:** 50%", "50"),
    ("Final Answer:\n72", "72"),
    ("Final Answer: 7.0", "7"),
    ("Final Answer: -4", "-4"),
    ("He had 10 and lost 4, so 10-4", "4"),
    ("It is 3/4 of the cake.", "0.75"),
    ("So the total is \\boxed{1,234}.", "1234"),
    ("Final Answer: <answer>\nI think it is 12.", "12"),
    ("I don't know.", None),
])
def test_number_extraction(text, expected):
    assert extract_answer(text, "gsm8k") == expected


def test_number_rewards():
    assert reward("Final Answer: $1,000.00.", "1000", "svamp") == 1
    assert reward("Final Answer: 0.5", "1/2", "asdiv") == 1
    assert reward("Final Answer: 12", "12.5", "mawps") == 0
    # the Final Answer line wins over a later stray number
    assert reward("Final Answer: 8\n(checked with 2 + 6 = 9)", "8", "gsm8k") == 1


@pytest.mark.parametrize("text,expected", [
    ("Final Answer: B", "B"),
    ("Final Answer: (d)", "D"),
    ("I'd pick (B).", "B"),
    ("So the answer is C.", "C"),
    ("the answer is B", "B"),
    ("Final Answer: C) department store", "C"),
    ("Final Answer: department store", "C"),   # longest option text: not 'store'-like partials
    ("Final Answer: A bank", "A"),
    ("Final Answer: bank", "A"),
    ("A revolving door is at a bank.\nFinal Answer: library", "B"),
    ("Final Answer: \\boxed{E}", "E"),
    ("I cannot decide.", None),
])
def test_choice_extraction(text, expected):
    choices = {"A": "bank", "B": "library", "C": "department store", "D": "mall", "E": "new york"}
    assert extract_answer(text, "csqa", choices) == expected


def test_choice_gold_given_as_text_and_families():
    choices = {"A": "bank", "B": "library"}
    assert answers_equal("B", "library", "csqa", choices)
    assert not answers_equal("A", "library", "csqa", choices)
    assert answer_family("csqa") == "choice"
    assert answer_family("custom", {"A": "x"}) == "choice"
    assert answer_family("arith") == "number"
    assert answer_family("custom") == "math"


MALICIOUS = "__import__('os').system('touch {path}')"


@pytest.mark.parametrize("dataset", ["gsm8k", "math", "csqa", "custom"])
def test_malicious_answer_is_wrong_and_runs_nothing(tmp_path, dataset):
    target = tmp_path / "pwned"
    code = MALICIOUS.format(path=target)
    choices = {"A": "yes", "B": "no"} if dataset == "csqa" else None
    for text in (code, f"Final Answer: {code}", f"\\boxed{{{code}}}"):
        assert reward(text, "2", dataset, choices) == 0
        assert not math_equal(code, "0")
    assert not target.exists()


@pytest.mark.parametrize("hostile", [
    "9^{9^{9^{9^{9}}}}",          # a tower: exact powers are capped by size, floats overflow
    "(" * 2000 + "1" + ")" * 2000,  # nesting deeper than the parser allows
    "1+" * 5000 + "1",             # longer than the symbolic check accepts
    "10000000!",                   # factorial beyond the cap
    "\\sqrt[1000000]{2}^{10^{10}}",
])
def test_hostile_answers_are_fast_and_false(hostile):
    start = time.perf_counter()
    assert not math_equal(hostile, "7")
    assert time.perf_counter() - start < 1.0
