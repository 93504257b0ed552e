"""Paired comparisons by hand-worked cases: the sign test's exact tails, the bootstrap interval,
the pairing of units, and results.json / report.md carrying them."""

import json

import pytest

from malt_fast.eval.evaluate import format_table, summarize, write_report
from malt_fast.eval.stats import (compare, fewest_units_to_reject, paired_bootstrap, paired_units,
                                  sign_test, significant)


def pq(**methods):
    """per_question from {method: {seed: [correct per question]}}."""
    return {m: {str(s): {f"q{i}": {"answer": None, "correct": float(c)} for i, c in enumerate(cs)}
                for s, cs in seeds.items()} for m, seeds in methods.items()}


def test_sign_test_exact_tails():
    assert sign_test(0, 0) == 1.0              # nothing differs
    assert sign_test(5, 5) == 1.0              # ties: no evidence either way
    assert sign_test(1, 0) == 1.0              # 2 * 1/2
    assert sign_test(3, 0) == 0.25             # 2 * 1/8
    assert sign_test(10, 0) == 2 / 1024
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test(2, 8) == sign_test(8, 2)  # two-sided


def test_all_equal():
    c = compare(pq(A={0: [1, 0, 1, 1]}, B={0: [1, 0, 1, 1]}), "A", "B")
    assert (c["diff"], c["ci_low"], c["ci_high"], c["p"]) == (0.0, 0.0, 0.0, 1.0)
    assert (c["only_a"], c["only_b"], c["units"]) == (0, 0, 4)
    assert not significant(c)


def test_one_sided():
    # a right on 10 questions b got wrong, both right on 5: a - b = 10/15 = 66.7 points
    a, b = [1] * 15, [0] * 10 + [1] * 5
    c = compare(pq(A={0: a}, B={0: b}), "A", "B")
    assert c["diff"] == pytest.approx(100 * 10 / 15)
    assert c["p"] == 2 / 1024 and (c["only_a"], c["only_b"]) == (10, 0)
    assert 0 < c["ci_low"] < c["diff"] < c["ci_high"] <= 100 and significant(c)
    flipped = compare(pq(A={0: a}, B={0: b}), "B", "A")
    assert flipped["diff"] == -c["diff"] and flipped["p"] == c["p"]
    assert (flipped["only_a"], flipped["only_b"]) == (0, 10)


def test_few_units_are_not_significant_on_a_degenerate_interval():
    # 4 of 4 units favour a: the bootstrap interval is [100, 100], the sign test p = 1/8
    c = compare(pq(A={0: [1, 1, 1, 1]}, B={0: [0, 0, 0, 0]}), "A", "B")
    assert (c["ci_low"], c["ci_high"], c["p"]) == (100.0, 100.0, 0.125)
    assert not significant(c)
    assert significant(c, alpha=0.2)


def test_fewest_units_to_reject():
    assert fewest_units_to_reject() == 6          # 2 / 2^6 = 0.031 < 0.05 <= 2 / 2^5
    assert sign_test(6, 0) < 0.05 <= sign_test(5, 0)
    assert fewest_units_to_reject(0.01) == 8


def test_ties_and_fractions():
    # single-sample scores are fractions of chains: 2/3 vs 1/3 is a win, equal fractions a tie
    c = compare(pq(A={0: [2 / 3, 1 / 3, 1, 0]}, B={0: [1 / 3, 2 / 3, 1, 0]}), "A", "B")
    assert c["diff"] == pytest.approx(0.0) and c["p"] == 1.0
    assert (c["only_a"], c["only_b"]) == (1, 1)


def test_bootstrap_is_seeded_and_bounded():
    diffs = [1, 0, 0, -1, 1, 1, 0]
    assert paired_bootstrap(diffs) == paired_bootstrap(diffs)
    lo, hi = paired_bootstrap(diffs, resamples=10_000)
    assert -1 <= lo < sum(diffs) / len(diffs) < hi <= 1
    assert paired_bootstrap([1.0] * 9) == (1.0, 1.0)
    assert paired_bootstrap([]) == (0.0, 0.0)


def test_units_pair_by_seed_and_question():
    per_question = pq(A={0: [1, 0], 1: [1, 1]}, B={0: [0, 0], 2: [1, 1]})
    assert paired_units(per_question, "A", "B") == [(1.0, 0.0), (0.0, 0.0)]  # seed 0 only
    # trained seeds: "t/e" pairs with an untrained method's "e"
    per_question["T"] = {"7/0": per_question["A"]["0"], "8/0": per_question["A"]["0"]}
    assert len(paired_units(per_question, "T", "B")) == 4
    assert compare(per_question, "A", "missing") is None


def test_results_round_trip_and_report(tmp_path):
    results = summarize({"dataset": "arith", "seeds": [0, 1], "questions": 3, "chains_per_question": 3,
                         "transitions": {"MA": {"wrong_to_right": 1, "right_to_wrong": 2,
                                                "chains": 18}},
                         "per_question": pq(**{"MA+MV@3": {0: [0, 0, 1], 1: [0, 1, 0]},
                                               "MALT+MV@3": {0: [1, 1, 1], 1: [1, 1, 0]},
                                               "SA+MV@3": {0: [1, 0, 1], 1: [0, 1, 0]}})})
    assert results["methods"]["MALT+MV@3"]["per_seed"] == [1.0, 2 / 3]
    paths = write_report(results, tmp_path)
    assert json.loads(paths["results"].read_text()) == json.loads(json.dumps(results))
    pairs = [(c["a"], c["b"]) for c in results["comparisons"]]
    assert pairs == [("MALT+MV@3", "MA+MV@3"), ("MALT+MV@3", "SA+MV@3")]
    report = paths["report"].read_text()
    assert "| MALT+MV@3 − MA+MV@3 | +50.0 |" in report
    table = format_table(results)
    assert "MALT+MV@3 - SA+MV@3" in table and "not significant" in table


def test_table_states_the_smallest_difference_this_size_can_show():
    results = summarize({"dataset": "arith", "seeds": [0], "questions": 10, "chains_per_question": 3,
                         "transitions": {},
                         "per_question": pq(**{"MA+MV@3": {0: [0] * 10},
                                               "MALT+MV@3": {0: [1] * 10}})})
    (c,) = results["comparisons"]
    assert significant(c) and c["p"] == 2 / 1024
    table = format_table(results)
    assert "no difference under 60 points can be significant" in table   # 100 * 6 / 10
    assert "no difference is significant" not in table
