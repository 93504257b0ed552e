"""Paired comparisons of two methods on the same test questions and seeds.

A unit is one (seed, question) that both methods answered; its score is the method's correctness
there: 0 or 1 for a majority vote, the fraction of right chains for a single-sample method. Two
methods evaluated with the same seeds see the same questions and the same chain seeds, so their
units pair up one to one, and the comparison is about the methods, not about which questions
each drew.

- `diff`: mean(a - b) over the units, in accuracy points;
- `ci_low`, `ci_high`: a 95% paired bootstrap interval of that mean (units resampled with
  replacement, 10,000 times by default, with a fixed seed, so a rerun prints the same interval);
- `p`: the exact two-sided sign test on the units where a and b differ (for 0/1 scores that is
  the exact McNemar test): P(a split at least as uneven as the observed one | no difference);
- `only_a`, `only_b`: units where a scored higher (for votes: a right, b wrong), and the reverse.
"""

from __future__ import annotations

import math

import numpy as np

# the pairs the paper's Table 1 reports, as (a, b): a - b
COMPARISONS = (("MALT+MV@3", "MA+MV@3"), ("MALT+MV@3", "SA+MV@3"), ("MALT+MV@3", "STaR+MV@3"),
               ("MALT", "MA"), ("MALT", "SA"))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial test of wins vs losses at p = 1/2 (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def fewest_units_to_reject(alpha: float = 0.05) -> int:
    """The fewest units that must differ, all one way, for the sign test to reject at alpha:
    6 at 0.05 (p = 2/64). A run with n units cannot show a difference under 100 * 6 / n points."""
    k = 1
    while sign_test(k, 0) >= alpha:
        k += 1
    return k


def paired_bootstrap(diffs, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` under resampling of the units."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory for large test sets
        idx = rng.integers(0, d.size, size=(min(1000, resamples - start), d.size))
        means[start:start + idx.shape[0]] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_units(per_question: dict, a: str, b: str) -> list[tuple[float, float]]:
    """(score of a, score of b) for every (seed, question) both answered. A seed key
    "t/e" (training seed t, evaluation seed e) pairs with "t/e" or, when b was not trained,
    with "e"."""
    pa, pb = per_question[a], per_question[b]
    units = []
    for seed, questions in sorted(pa.items()):
        other = pb.get(seed) or pb.get(seed.rpartition("/")[2])
        if other is None:
            continue
        units += [(rec["correct"], other[qid]["correct"])
                  for qid, rec in sorted(questions.items()) if qid in other]
    return units


def compare(per_question: dict, a: str, b: str, resamples: int = 10_000, seed: int = 0) -> dict:
    """The paired comparison of methods a and b (module docstring); None if either is missing
    or they share no unit."""
    if a not in per_question or b not in per_question:
        return None
    units = paired_units(per_question, a, b)
    if not units:
        return None
    diffs = [x - y for x, y in units]
    lo, hi = paired_bootstrap(diffs, resamples, seed)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"a": a, "b": b, "diff": 100 * float(np.mean(diffs)), "ci_low": 100 * lo,
            "ci_high": 100 * hi, "p": sign_test(wins, losses), "only_a": int(wins),
            "only_b": int(losses), "units": len(units)}


def comparisons(per_question: dict, pairs=COMPARISONS) -> list[dict]:
    return [c for c in (compare(per_question, a, b) for a, b in pairs) if c is not None]


def significant(c: dict, alpha: float = 0.05) -> bool:
    """The 95% interval excludes 0 and the exact test rejects at `alpha`. Both, because with a
    handful of units the percentile bootstrap is degenerate: 4 units that all favour a give
    the interval [diff, diff], while the sign test says p = 0.125."""
    return (c["ci_low"] > 0 or c["ci_high"] < 0) and c["p"] < alpha
