"""Markdown tables of a roles study (benchmarks/roles_study.py), for benchmarks/results/roles.md.

    .venv/bin/python benchmarks/roles_report.py runs/roles/validation/arith_d1/summary.json

Per recipe: MV@3 accuracies, the paired comparisons MALT+MV@3 − STaR+MV@3 and MALT − SA, the
roles of the untrained (MA) and trained (MALT) pipelines, and what the training trees held to
learn correction from. Reads files only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from malt_fast.eval.roles import iter_records, gated_accuracy, roles_table, tune_threshold
from malt_fast.eval.stats import compare, significant


def pct(results: dict, method: str) -> str:
    m = results["methods"].get(method)
    return "—" if m is None else f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"


def comparison(results: dict, a: str, b: str) -> str:
    c = compare(results["per_question"], a, b)
    if c is None:
        return "—"
    mark = " *" if significant(c) else ""
    return f"{c['diff']:+.1f} [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}] p={c['p']:.2g}{mark}"


def report(summary: dict) -> str:
    lines = ["| recipe | SA+MV@3 | MA+MV@3 | STaR+MV@3 | MALT+MV@3 | MALT+MV@3 − STaR+MV@3 "
             "| MALT − SA |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for recipe, r in summary.items():
        lines.append(f"| {recipe} | {pct(r, 'SA+MV@3')} | {pct(r, 'MA+MV@3')} | "
                     f"{pct(r, 'STaR+MV@3')} | {pct(r, 'MALT+MV@3')} | "
                     f"{comparison(r, 'MALT+MV@3', 'STaR+MV@3')} | {comparison(r, 'MALT', 'SA')} |")
    lines += ["", "(* significant: the 95% paired interval excludes 0 and p < 0.05)", ""]
    for recipe, r in summary.items():
        lines += [f"Roles, `{recipe}`:", "", *roles_table(r["roles"]), ""]
    lines += ["What the training trees held (credit summary, `correction`):", "",
              "| recipe | generations wrong / right | critiques flagging wrong / right | "
              "fixes | kept wrong | kept right | broken | refiner SFT / pairs |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for recipe, r in summary.items():
        c = r["credit"]["correction"]
        lines.append(f"| {recipe} | {c['generations_wrong']} / {c['generations_right']} | "
                     f"{c['wrong_flagged']}/{c['critiques_under_wrong']} / "
                     f"{c['right_flagged']}/{c['critiques_under_right']} | {c['fixes']} | "
                     f"{c['kept_wrong']} | {c['kept_right']} | {c['broken']} | "
                     f"{c['refiner_sft']} / {c['refiner_pairs']} |")
    return "\n".join(lines)


def score_gate(validation: dict, test: dict) -> str:
    """A flag by the verifier's score instead of its sampled verdict: the threshold tuned on
    each recipe's validation chains, applied to its test chains (both refined always)."""
    lines = ["| recipe | pipeline | threshold (validation) | validation: generator / always / "
             "gated | test: generator / always / gated | test chains above it: wrong / all | "
             "their wrong → right / right → wrong |", "| --- | --- | ---: | --- | --- | --- | --- |"]
    for recipe in validation.keys() & test.keys():
        for pipeline, val in validation[recipe]["chains"].items():
            tst, t = test[recipe]["chains"][pipeline], tune_threshold(val)
            if t is None:
                continue
            above = [r for _, _, recs in iter_records(tst) for r in recs
                     if r["score"] is not None and r["score"] > t]
            acc = lambda c, th: f"{100 * gated_accuracy(c, th):.1f}"  # noqa: E731
            lines.append(
                f"| {recipe} | {pipeline} | {t:.3f} | {acc(val, float('inf'))} / "
                f"{acc(val, -1.0)} / {acc(val, t)} | {acc(tst, float('inf'))} / "
                f"{acc(tst, -1.0)} / {acc(tst, t)} | "
                f"{sum(not r['g_correct'] for r in above)} / {len(above)} | "
                f"{sum(r['r_correct'] and not r['g_correct'] for r in above)} / "
                f"{sum(r['g_correct'] and not r['r_correct'] for r in above)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("summary", type=Path)
    ap.add_argument("--threshold-from", type=Path, metavar="VALIDATION_SUMMARY",
                    help="also tune a score threshold on this validation summary and apply it "
                         "to SUMMARY's chains (single-chain accuracy, %%)")
    args = ap.parse_args()
    summary = json.loads(args.summary.read_text())
    print(report(summary))
    if args.threshold_from:
        print("\n" + score_gate(json.loads(args.threshold_from.read_text()), summary))


if __name__ == "__main__":
    main()
