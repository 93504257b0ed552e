"""The 'arith' task: deterministic, disjoint splits, and golds that match the question text."""

import re

import pytest

from malt_fast.data.synthetic import make_arith
from malt_fast.errors import MaltError
from malt_fast.malt.answers import is_correct


def solve(question: str) -> int:
    """An independent reading of the problem text, sentence by sentence."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    amount = int(re.match(r"\w+ has (\d+) ", sentences[0]).group(1))
    for s in sentences[1:]:
        s = s.strip()
        if m := re.search(r"(?:buys|finds|gives (?:him|her)) (\d+) more", s):
            amount += int(m.group(1))
        elif m := re.search(r"(?:gives|loses|eats) (\d+) ", s):
            amount -= int(m.group(1))
        elif m := re.search(r"buys (\d+) bags with (\d+) ", s):
            amount += int(m.group(1)) * int(m.group(2))
        elif "doubles" in s or "triples" in s:
            amount *= 2 if "doubles" in s else 3
        elif m := re.search(r"into (\d+) boxes", s):
            assert amount % int(m.group(1)) == 0
            amount //= int(m.group(1))
        else:
            assert s.startswith("How many"), s
    return amount


@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_golds_match_the_text(difficulty):
    for ex in make_arith(300, "train", difficulty) + make_arith(100, "test", difficulty):
        assert ex.dataset == "arith" and ex.choices is None
        assert ex.gold == str(solve(ex.question)) and int(ex.gold) >= 0
        assert is_correct(f"So...\nFinal Answer: {ex.gold}", ex.gold, "arith")


def test_difficulty_sets_events_and_number_range():
    for d in (1, 2, 4):
        for ex in make_arith(100, "test", d):
            events = len(re.findall(r"[.]", ex.question)) - 1  # between start and question
            assert 1 <= events <= d
            assert int(re.match(r"\w+ has (\d+)", ex.question).group(1)) <= 10 * d
    one = make_arith(200, "train", 1)
    assert all(len(re.findall(r"\d+", ex.question)) == 2 for ex in one)


def test_deterministic_prefix_and_seeded():
    a = make_arith(50, "train", 2, seed=1)
    assert a == make_arith(50, "train", 2, seed=1)
    assert a[:20] == make_arith(20, "train", 2, seed=1)
    assert [e.question for e in a] != [e.question for e in make_arith(50, "train", 2, seed=2)]
    assert len({e.id for e in a}) == 50 and len({e.question for e in a}) == 50
    assert a[0].id == "arith-d2-s1-train-0"


def test_splits_are_disjoint_across_seeds():
    train = {e.question for s in (0, 1) for e in make_arith(1500, "train", 1, seed=s)}
    test = {e.question for s in (0, 1) for e in make_arith(500, "test", 1, seed=s)}
    assert not train & test


@pytest.mark.parametrize("args,message", [
    ((5, "validation"), "no split 'validation'"),
    ((5, "train", 0), "difficulty must be an integer >= 1"),
    ((-1, "train"), "n must be a non-negative integer"),
])
def test_bad_arguments(args, message):
    with pytest.raises(MaltError, match=message):
        make_arith(*args)
