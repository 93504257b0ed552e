"""Markdown tables of finished `malt-fast run` directories, for benchmarks/results/malt.md.

    .venv/bin/python benchmarks/malt_report.py runs/default runs/arith_100

Per run: accuracy per method (mean ± std over seeds, and each seed), the paired comparisons of
results.json, the refiner's wrong → right and right → wrong transitions, wall time per stage (from
RUN_DIR/metrics.jsonl), and the size of the training data and the share of replies cut by the
token budget (from data/summary.json). Reads files only; runs no model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from malt_fast.eval.evaluate import comparison_rows, seeds_phrase


def stage_times(run: Path) -> dict[str, float]:
    """Wall seconds per stage; a stage resumed after a kill is summed over its attempts."""
    out: dict[str, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "chunk" in rec:  # per-chunk lines of the expansion repeat its total
            continue
        out[rec["stage"]] = out.get(rec["stage"], 0.0) + rec["wall_s"]
    return out


def report(run: Path) -> str:
    results = json.loads((run / "eval" / "results.json").read_text())
    summary = json.loads((run / "data" / "summary.json").read_text())
    seeds = results["seeds"]
    chains = results.get("chains_per_question", results.get("chains"))  # (older runs: chains)
    lines = [f"### `{run}`", "",
             f"{summary['questions']} training questions; evaluation: {len(seeds)} seeds × "
             f"{results['questions']} test questions × {chains} chains; mean ± std "
             f"over {seeds_phrase(results)}.", "",
             "| method | accuracy % (mean ± std) | per seed |", "| --- | --- | --- |"]
    for m, r in results["methods"].items():
        per = ", ".join(f"{100 * x:.1f}" for x in r["per_seed"])
        lines.append(f"| {m} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {per} |")
    if results.get("comparisons"):
        lines += ["", *comparison_rows(results["comparisons"])]
    lines += ["", "| pipeline | wrong → right | right → wrong | chains |", "| --- | --- | --- | --- |"]
    for name, t in results["transitions"].items():
        lines.append(f"| {name} | {t['wrong_to_right']} | {t['right_to_wrong']} | {t['chains']} |")
    times = stage_times(run)
    total = sum(times.values())
    lines += ["", "| stage | wall s | share |", "| --- | ---: | ---: |"]
    for stage, s in times.items():
        lines.append(f"| {stage} | {s:.0f} | {100 * s / total:.0f}% |")
    lines.append(f"| total (stages) | {total:.0f} | 100% |")
    roles = summary["roles"]
    data = "; ".join(f"{r}: {v['sft']} SFT rows, {v['pairs']} DPO pairs"
                     + (f", {100 * v['cut_fraction']:.1f}% of replies cut" if "cut_fraction" in v
                        else "") for r, v in roles.items())
    star = summary.get("star", {}).get("sft")
    lines += ["", f"Training data: {data}" + (f"; STaR: {star} SFT rows." if star else ".")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    print("\n".join(report(r) for r in args.runs))


if __name__ == "__main__":
    main()
