"""Role diagnostics from hand-written chain records: counts, AUROC with ties, refiner net effect."""

import pytest

from malt_fast.eval.evaluate import merge_seeds, summarize
from malt_fast.eval.roles import auroc, chain_record, format_roles, role_stats


def rec(g, flagged, score, r):
    return chain_record(g, flagged, score, r)


# seed "0": q1 three chains, q2 three chains; seed "1": q1 three chains
CHAINS = {
    "0": {"q1": [rec(False, True, 0.9, True), rec(False, False, 0.6, False),
                 rec(True, False, 0.6, True)],
          "q2": [rec(True, False, 0.2, False), rec(True, True, 0.1, True),
                 rec(False, True, 0.6, False)]},
    "1": {"q1": [rec(False, False, None, False), rec(True, False, None, True),
                 rec(True, False, None, True)]},
}


def test_counts_equal_the_records():
    s = role_stats(CHAINS)
    v, f = s["verifier"], s["refiner"]
    # wrong generations: q1 c0, q1 c1, q2 c2, s1 q1 c0 -> 4, flagged: q1 c0, q2 c2 -> 2
    assert (v["wrong"], v["wrong_flagged"], v["right"], v["right_flagged"]) == (4, 2, 5, 1)
    assert v["scored"] == 6
    assert (f["wrong_to_right"], f["right_to_wrong"], f["wrong_to_wrong"],
            f["right_to_right"]) == (1, 1, 3, 4)


def test_auroc_with_ties_by_hand():
    # wrong {0.9, 0.6, 0.6} vs right {0.6, 0.2, 0.1}: 0.9 beats all 3; each 0.6 ties one
    # (1/2) and beats two: (3 + 2.5 + 2.5) / 9
    assert role_stats(CHAINS)["verifier"]["auroc"] == pytest.approx(8 / 9)
    assert auroc([0.5, 0.5], [0.5]) == 0.5  # all tied: chance
    assert auroc([1.0], [0.0, 0.2]) == 1.0
    assert auroc([0.0], [1.0]) == 0.0
    assert auroc([], [0.3]) is None and auroc([0.3], []) is None
    # the Mann-Whitney statistic equals the pairwise count on random data
    import random
    rng = random.Random(0)
    w = [rng.choice([0.1, 0.2, 0.5, 0.7]) for _ in range(23)]
    r = [rng.choice([0.1, 0.2, 0.5, 0.9]) for _ in range(17)]
    pairs = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in w for b in r)
    assert auroc(w, r) == pytest.approx(pairs / (len(w) * len(r)))


def test_no_scores_no_auroc():
    chains = {"0": {"q": [rec(False, False, None, False), rec(True, False, None, True)]}}
    v = role_stats(chains)["verifier"]
    assert v["auroc"] is None and v["scored"] == 0


def test_refiner_net_effect_per_unit():
    net = role_stats(CHAINS)["refiner"]["net"]
    # units: s0 q1 (+1 -1 +0... ): c0 w->r +1, c1 w->w 0, c2 r->r 0 -> +1/3
    #        s0 q2: c0 r->w -1, c1 r->r 0, c2 w->w 0 -> -1/3;  s1 q1: 0
    assert net["units"] == 3 and net["diff"] == pytest.approx(0.0)
    assert (net["only_a"], net["only_b"]) == (1, 1) and net["p"] == 1.0
    assert net["ci_low"] <= 0 <= net["ci_high"]
    one_way = {"0": {f"q{i}": [rec(False, True, 0.9, True)] for i in range(8)}}
    net = role_stats(one_way)["refiner"]["net"]
    assert net["diff"] == 100 and net["ci_low"] == 100 and net["p"] == pytest.approx(2 / 256)


def test_results_roles_follow_the_chains_through_merges():
    def part(seed, chains):
        return summarize({"dataset": "arith", "seeds": [seed], "questions": 2,
                          "chains_per_question": 3, "transitions": {},
                          "per_question": {"MA": {str(seed): {"q": {"answer": "1",
                                                                    "correct": 1.0}}}},
                          "chains": {"MA": {str(seed): chains}}})

    a, b = part(0, CHAINS["0"]), part(1, CHAINS["1"])
    assert a["roles"]["MA"]["verifier"]["wrong"] == 3
    merged = merge_seeds([a, b])
    assert merged["chains"]["MA"] == CHAINS
    assert merged["roles"]["MA"] == role_stats(CHAINS)
    line = format_roles(merged["roles"])
    assert "wrong 2/4 (50%)" in line and "right 1/5 (20%)" in line and "AUROC 0.89" in line


def test_gated_accuracy_and_tuned_threshold_by_hand():
    from malt_fast.eval.roles import gated_accuracy, tune_threshold

    rec = chain_record
    chains = {"0": {"q1": [rec(False, False, 0.9, True),    # a fix, high score
                           rec(True, False, 0.6, False),    # a break, mid score
                           rec(True, False, 0.1, True)],
                    "q2": [rec(False, False, 0.4, False),
                           rec(True, False, None, False)]}}  # no score: never refined
    # refine nothing: the generator's answers, 3/5
    assert gated_accuracy(chains, float("inf")) == 3 / 5
    # refine only the 0.9 chain: its fix counts, 4/5
    assert gated_accuracy(chains, 0.6) == 4 / 5
    # refine 0.9 and 0.6: the break cancels the fix
    assert gated_accuracy(chains, 0.4) == 3 / 5
    # refine every scored chain
    assert gated_accuracy(chains, -1.0) == 3 / 5
    # the best is 4/5, reached for every t in [0.6, 0.9); the highest candidate is 0.6
    assert tune_threshold(chains) == 0.6
    assert gated_accuracy({}, 0.5) is None and tune_threshold({}) is None
