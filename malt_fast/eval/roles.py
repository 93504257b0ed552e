"""What the verifier and the refiner do in a G->V->R pipeline, from its chains.

A chain record is `{"g_correct", "flagged", "score", "r_correct"}`: whether the generator's
answer was right, whether the verifier's verdict said it was wrong (a critique without a verdict
counts as not flagged), the verifier's probability that it is wrong (read from the verdict
token's logits; null where there is none) and whether the refiner's final answer was right.
Records live in `results["chains"][pipeline][seed][question id]`, one list per question.

From them, per pipeline (`results["roles"]`):

- verifier: generations wrong / right and how many of each were flagged; `auroc`, the
  probability that a wrong generation's score is above a right one's (ties count one half:
  the Mann-Whitney statistic), over the chains that have a score; null when no chain of either
  class has one;
- refiner: the four transitions between the generator's and the final answer, and `net`: the
  paired comparison of final against generator accuracy per (seed, question) unit, the refiner's
  net effect (wrong->right minus right->wrong per chain) with a 95% bootstrap interval and the
  exact sign test, as the method comparisons have.
"""

from __future__ import annotations

from malt_fast.eval.stats import paired_bootstrap, sign_test

PIPELINES = ("MA", "MALT")


def chain_record(g_correct: bool, flagged: bool, score: float | None, r_correct: bool) -> dict:
    return {"g_correct": bool(g_correct), "flagged": bool(flagged),
            "score": None if score is None else float(score), "r_correct": bool(r_correct)}


def auroc(wrong: list[float], right: list[float]) -> float | None:
    """P(a wrong generation's score > a right one's) + P(tie) / 2; None if a class is empty."""
    if not wrong or not right:
        return None
    ranked = sorted([(s, 1) for s in wrong] + [(s, 0) for s in right])
    # average ranks over ties (1-based), then the Mann-Whitney U of the wrong class
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + 1 + j) / 2
        rank_sum += mid * sum(label for _, label in ranked[i:j])
        i = j
    u = rank_sum - len(wrong) * (len(wrong) + 1) / 2
    return u / (len(wrong) * len(right))


def iter_records(chains: dict):
    """Every (seed, question id, chain records) of one pipeline, in a fixed order."""
    for seed, questions in sorted(chains.items()):
        for qid, records in sorted(questions.items()):
            yield seed, qid, records


def role_stats(chains: dict) -> dict:
    """`{"verifier": {...}, "refiner": {...}}` of one pipeline's chain records."""
    recs = [r for _, _, records in iter_records(chains) for r in records]
    wrong = [r for r in recs if not r["g_correct"]]
    right = [r for r in recs if r["g_correct"]]
    scored_wrong = [r["score"] for r in wrong if r["score"] is not None]
    scored_right = [r["score"] for r in right if r["score"] is not None]
    verifier = {"wrong": len(wrong), "wrong_flagged": sum(r["flagged"] for r in wrong),
                "right": len(right), "right_flagged": sum(r["flagged"] for r in right),
                "scored": len(scored_wrong) + len(scored_right),
                "auroc": auroc(scored_wrong, scored_right)}
    refiner = {"wrong_to_right": sum(r["r_correct"] for r in wrong),
               "right_to_wrong": sum(not r["r_correct"] for r in right),
               "wrong_to_wrong": sum(not r["r_correct"] for r in wrong),
               "right_to_right": sum(r["r_correct"] for r in right),
               "net": refiner_net(chains)}
    return {"verifier": verifier, "refiner": refiner}


def refiner_net(chains: dict, resamples: int = 10_000, seed: int = 0) -> dict | None:
    """The refiner's net effect per (seed, question): the mean over its chains of
    r_correct - g_correct, in points, with a paired bootstrap interval and the sign test over
    the units where it is not 0. None without chains."""
    diffs = [sum(r["r_correct"] - r["g_correct"] for r in records) / len(records)
             for _, _, records in iter_records(chains) if records]
    if not diffs:
        return None
    lo, hi = paired_bootstrap(diffs, resamples, seed)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"diff": 100 * sum(diffs) / len(diffs), "ci_low": 100 * lo, "ci_high": 100 * hi,
            "p": sign_test(wins, losses), "only_a": wins, "only_b": losses,
            "units": len(diffs)}


def gated_accuracy(chains: dict, threshold: float) -> float | None:
    """Single-chain accuracy had the refiner rewritten only the generations whose score is
    above `threshold` (the others keep the generator's answer), read from chains where the
    refiner rewrote every generation: its reply does not depend on the gate. None without
    chains."""
    recs = [r for _, _, records in iter_records(chains) for r in records]
    if not recs:
        return None
    kept = sum(r["r_correct"] if r["score"] is not None and r["score"] > threshold
               else r["g_correct"] for r in recs)
    return kept / len(recs)


def tune_threshold(chains: dict) -> float | None:
    """The score threshold that maximises gated_accuracy on `chains` (a validation split's),
    among "refine nothing" (+inf) and every observed score; ties go to the higher threshold,
    which refines less. None without scores."""
    scores = sorted({r["score"] for _, _, records in iter_records(chains) for r in records
                     if r["score"] is not None})
    if not scores:
        return None
    candidates = [float("inf")] + scores[::-1]
    return max(candidates, key=lambda t: gated_accuracy(chains, t))  # first max: highest t


def roles_of(all_chains: dict) -> dict:
    """results["roles"] from results["chains"]."""
    return {p: role_stats(c) for p, c in all_chains.items()}


def merge_chains(target: dict, chains: dict) -> None:
    """Add per-seed chain records (results["chains"] of a part) into `target`."""
    for pipeline, seeds in chains.items():
        target.setdefault(pipeline, {}).update(seeds)


def _rate(k: int, n: int) -> str:
    return f"{k}/{n}" + (f" ({100 * k / n:.0f}%)" if n else "")


def format_roles(roles: dict) -> str:
    """One line per pipeline: verifier flag rates and AUROC, refiner transitions and net."""
    lines = []
    for name, r in roles.items():
        v, f = r["verifier"], r["refiner"]
        auc = "n/a" if v["auroc"] is None else f"{v['auroc']:.2f}"
        net = f["net"]
        net_s = "" if net is None else (f", net {net['diff']:+.1f} points [{net['ci_low']:+.1f}, "
                                        f"{net['ci_high']:+.1f}] p={net['p']:.3g}")
        lines.append(f"{name:<5} verifier flags wrong {_rate(v['wrong_flagged'], v['wrong'])}, "
                     f"right {_rate(v['right_flagged'], v['right'])}, AUROC {auc}; "
                     f"refiner wrong->right {f['wrong_to_right']}, right->wrong "
                     f"{f['right_to_wrong']}{net_s}")
    return "\n".join(lines)


def roles_table(roles: dict) -> list[str]:
    """report.md's rows: the same numbers as format_roles, as a markdown table."""
    rows = ["| Pipeline | wrong flagged | right flagged | AUROC | wrong → right | right → wrong "
            "| wrong → wrong | right → right | refiner net, points [95% CI] | p |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, r in roles.items():
        v, f = r["verifier"], r["refiner"]
        auc = "—" if v["auroc"] is None else f"{v['auroc']:.3f}"
        net = f["net"]
        net_s = "—" if net is None else f"{net['diff']:+.1f} [{net['ci_low']:+.1f}, " \
                                        f"{net['ci_high']:+.1f}]"
        p = "—" if net is None else f"{net['p']:.3g}"
        rows.append(f"| {name} | {_rate(v['wrong_flagged'], v['wrong'])} | "
                    f"{_rate(v['right_flagged'], v['right'])} | {auc} | {f['wrong_to_right']} | "
                    f"{f['right_to_wrong']} | {f['wrong_to_wrong']} | {f['right_to_right']} | "
                    f"{net_s} | {p} |")
    return rows
