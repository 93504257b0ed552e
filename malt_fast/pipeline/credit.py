"""The credit stage: trees.jsonl -> RUN_DIR/data/ (values and labels per node, SFT and DPO sets
per role, summary.json written last). Rank 0 alone: it takes seconds."""

from __future__ import annotations

import time
from pathlib import Path

from malt_fast import ranks
from malt_fast.phases import phase
from malt_fast.pipeline.models import ROLES
from malt_fast.pipeline.run_dir import Run


def credit(run: Run, trees: Path) -> Path:
    from malt_fast.malt.credit import Recipe, run_credit

    out = run.dir / "data"
    if run.finished("credit", out / "summary.json"):
        return out
    if ranks.is_main():
        t0 = time.perf_counter()
        k = run.cfg["credit"]
        with phase("credit"):
            summary = run_credit(trees, out, theta=run.theta, pairs=k["pairs"],
                                 max_pairs=k["max_pairs"], seed=run.seed,
                                 prompts_path=run.cfg["prompts"], cut_replies=k["cut_replies"],
                                 log=run.log, recipe=Recipe(k["recipe"], k["verdict_weight"],
                                                            k["copy_share"]))
        run.record("credit", time.perf_counter() - t0, summary=summary)
    ranks.barrier()
    return out


def format_credit(summary: dict, round_no=None) -> str:
    """One line of the credit stage's summary: training rows per role and the replies cut by
    the token budget (what `credit.cut_replies` did with them)."""
    roles = summary["roles"]
    rows = ", ".join(f"{r} {roles[r]['sft']} SFT / {roles[r]['pairs']} pairs" for r in ROLES)
    cut = ", ".join(f"{r} {100 * roles[r].get('cut_fraction', 0):.1f}%" for r in ROLES)
    what = "dropped from training" if summary.get("cut_replies", "drop") == "drop" else \
        "trained as open turns"
    tag = f"round {round_no} " if round_no is not None else ""
    return (f"{tag}training sets: {rows}\n{tag}replies cut by the token budget: {cut} "
            f"({what}; raise sampling.max_new_tokens if this is large)")
