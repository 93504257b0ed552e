"""How many (seed, question) units a run needs before a paired comparison is significant.

    .venv/bin/python benchmarks/power.py runs/arith_100/eval/results.json \\
        --pair "MALT+MV@3" "MA+MV@3" --units 24 48 96 192 384

Takes a finished run's per-question results as the population: the paired differences a − b
of its units (malt_fast/eval/stats.py). For each size n it draws n units with replacement,
`--trials` times, and counts how often the draw would be reported significant: its 95% paired
bootstrap interval excludes 0 and its exact sign test gives p < 0.05, the rule of the run's
report (`malt_fast.eval.stats.significant`). That is the power a run of n units would have if
the true per-unit differences were the measured ones. Reads files only; runs no model.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from malt_fast.eval.stats import paired_bootstrap, paired_units, sign_test, significant


def reported_significant(draws: np.ndarray, resamples: int) -> np.ndarray:
    """For each row of `draws` (trials x n differences): would the run's report call it
    significant?"""
    out = np.empty(draws.shape[0], dtype=bool)
    for t, d in enumerate(draws):
        lo, hi = paired_bootstrap(d, resamples, seed=t)
        out[t] = significant({"ci_low": lo, "ci_high": hi,
                              "p": sign_test(int((d > 0).sum()), int((d < 0).sum()))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="a run's eval/results.json")
    ap.add_argument("--pair", nargs=2, default=["MALT+MV@3", "MA+MV@3"], metavar=("A", "B"))
    ap.add_argument("--units", nargs="+", type=int, default=[24, 48, 96, 192, 384, 768])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.results) as f:
        per_question = json.load(f)["per_question"]
    a, b = args.pair
    diffs = np.array([x - y for x, y in paired_units(per_question, a, b)], dtype=np.float64)
    if diffs.size == 0:
        raise SystemExit(f"{args.results}: {a} and {b} share no (seed, question) unit")
    rng = np.random.default_rng(args.seed)
    print(f"{a} - {b} in {args.results}: {diffs.size} units, mean difference "
          f"{100 * diffs.mean():+.1f} points, {int((diffs > 0).sum())} units better / "
          f"{int((diffs < 0).sum())} worse")
    print(f"{'units':>6} {'power':>6}   (share of {args.trials} draws reported significant)")
    for n in args.units:
        draws = diffs[rng.integers(0, diffs.size, size=(args.trials, n))]
        power = reported_significant(draws, args.resamples).mean()
        print(f"{n:>6} {power:>6.2f}")


if __name__ == "__main__":
    main()
