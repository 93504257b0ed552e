"""Iterative MALT (`rounds: k`, k > 1): round r + 1 expands with round r's trained roles and its
training continues from those weights; the credit threshold follows `credit.theta_schedule`.
RUN_DIR/rounds.md, rounds.json and plots/rounds.png compare the rounds."""

from __future__ import annotations

import json
from pathlib import Path

from malt_fast import ranks
from malt_fast.pipeline.models import ROLES
from malt_fast.pipeline.run_dir import Run


def previous_checkpoints(run: Run) -> Path | None:
    """Round r - 1's exported roles, which round r expands with and trains from."""
    if run.round == 1:
        return None
    return run.round_dir(run.round - 1) / "train" / "checkpoints"


def start_round(run: Run) -> None:
    """Round r >= 2: load round r - 1's trained roles, which this round expands with and
    trains on from. Done whether or not this round's expansion is already complete, so a
    resumed run trains from the same weights as an uninterrupted one."""
    from malt_fast.malt.trees import atomic_write_text

    if run.cfg["rounds"] == 1:
        return
    prev = previous_checkpoints(run)
    loaded = run.models.use_roles(prev) if prev is not None else []
    info = {"round": run.round, "theta": run.theta, "seed": run.seed,
            "adapters_from": str(prev) if prev is not None else None,
            "roles_from_adapters": loaded}
    if ranks.is_main():
        atomic_write_text(run.dir / "round.json", json.dumps(info, indent=2) + "\n")


def rounds_summary(rounds: list[dict]) -> dict:
    """rounds[i] = {round, theta, results, summary}: accuracy per round (round 0 = untrained)."""
    first = rounds[0]["results"]["methods"]
    rows = [{"round": 0, "theta": None, "pipeline": first["MA"], "pipeline_mv": first["MA+MV@3"],
             "note": "untrained (MA, MA+MV@3)"}]
    for r in rounds:
        m = r["results"]["methods"]
        rows.append({"round": r["round"], "theta": r["theta"],
                     "pipeline": m.get("MALT"), "pipeline_mv": m.get("MALT+MV@3"),
                     "credit": r.get("summary"), "note": "MALT, MALT+MV@3"})
    return {"dataset": rounds[0]["results"]["dataset"], "seeds": rounds[0]["results"]["seeds"],
            "SA": first["SA"], "SA+MV@3": first["SA+MV@3"], "rounds": rows}


def _pct(r) -> str:
    return "—" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"


def format_rounds(summary: dict) -> str:
    lines = [f"{'round':<8} {'theta':>6}  {'pipeline (%)':>16}  {'pipeline+MV@3 (%)':>18}"]
    for row in summary["rounds"]:
        name = "0 (MA)" if row["round"] == 0 else str(row["round"])
        theta = "—" if row["theta"] is None else f"{row['theta']:.3g}"
        lines.append(f"{name:<8} {theta:>6}  {_pct(row['pipeline']):>16}  "
                     f"{_pct(row['pipeline_mv']):>18}")
    return "\n".join(lines)


def write_rounds(root: Path, summary: dict) -> dict:
    from malt_fast.malt.trees import atomic_write_text

    root = Path(root)
    atomic_write_text(root / "rounds.json", json.dumps(summary, indent=2) + "\n")
    lines = [f"# Iterative MALT: {summary['dataset']}", "",
             f"Accuracy (%) per round, mean ± std over {len(summary['seeds'])} seeds. Round 0 is "
             "the untrained pipeline (MA); round r uses the roles trained in rounds 1..r.", "",
             "| round | theta | G→V→R | G→V→R + MV@3 | SFT rows (g/v/r) "
             "| DPO pairs (g/v/r) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in summary["rounds"]:
        c = row.get("credit") or {}
        roles = c.get("roles", {})
        sft = "/".join(str(roles[r]["sft"]) for r in ROLES) if roles else "—"
        pairs = "/".join(str(roles[r]["pairs"]) for r in ROLES) if roles else "—"
        theta = "—" if row["theta"] is None else f"{row['theta']:g}"
        lines.append(f"| {row['round']} | {theta} | {_pct(row['pipeline'])} | "
                     f"{_pct(row['pipeline_mv'])} | {sft} | {pairs} |")
    lines += ["", f"Single agent (untrained): SA {_pct(summary['SA'])}, "
              f"SA+MV@3 {_pct(summary['SA+MV@3'])}."]
    atomic_write_text(root / "rounds.md", "\n".join(lines) + "\n")
    plot = root / "plots" / "rounds.png"
    plot_rounds(summary, plot)
    return {"json": root / "rounds.json", "report": root / "rounds.md", "plot": plot}


def plot_rounds(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in summary["rounds"] if r["pipeline"] is not None]
    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, label, color in (("pipeline", "G→V→R", "#4C72B0"),
                              ("pipeline_mv", "G→V→R + MV@3", "#DD8452")):
        ax.errorbar(x, [100 * r[key]["mean"] for r in rows],
                    yerr=[100 * r[key]["std"] for r in rows], marker="o", capsize=4,
                    label=label, color=color)
    ax.axhline(100 * summary["SA"]["mean"], ls="--", color="grey", label="SA (untrained)")
    ax.set_xticks(x)
    ax.set_xticklabels(["0\n(MA)" if r == 0 else f"{r}\nθ={t['theta']:g}"
                        for r, t in zip(x, rows)])
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{summary['dataset']}: iterative MALT, mean ± std over "
                 f"{len(summary['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
