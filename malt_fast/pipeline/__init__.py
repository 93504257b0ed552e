"""`malt-fast run CONFIG`: expand -> credit -> train -> evaluate in one run directory.

One module per stage, in data-flow order, each a function from the files before it to the files
it writes, with the round's context (`Run`: config, directory, seed, models, log) passed in;
the CLI's single-stage commands call the same functions:

    inputs.py    the config and the files it names, checked before any weights load
    run_dir.py   Run: one round's directory, stage records, the settings guard, --restart
    models.py    Models: base model and tokenizer, the roles' trained weights, engines
    expand.py    questions -> trees.jsonl
    credit.py    trees.jsonl -> data/ (SFT and DPO sets per role)
    train.py     data/ -> train/checkpoints/{role}/ (in process, or DeepSpeed under torchrun)
    evaluate.py  test questions + checkpoints -> eval/ (results.json, report.md, plots)
    rounds.py    iterative MALT: a round starts from the previous round's roles

Each stage is skipped when its outputs are complete and resumed when they are partial:
trees.jsonl skips finished question ids, credit writes summary.json last, training is complete
once every role is exported and resumes from its checkpoints otherwise, evaluation keeps one file
per finished group of seeds and writes results.json last. So a run killed at any moment and
started again with the same command ends with the same files as a run that was never interrupted
(docs/pipeline.md). Started under torchrun, every stage runs on the launcher's ranks
(malt_fast/ranks.py, docs/distributed.md).
"""

from __future__ import annotations

import json

from malt_fast import ranks
# the stage modules by their names (each holds the function of the same name)
from malt_fast.pipeline import credit, evaluate, expand, rounds, train
from malt_fast.pipeline.inputs import check_inputs, resolve
from malt_fast.pipeline.run_dir import Run

__all__ = ["Run", "check_inputs", "resolve", "run_pipeline"]


def run_pipeline(cfg: dict, log=print) -> dict:
    """Every round's stages in order, each skipped or resumed as its files say; prints the
    results table and where the outputs are. Returns the last round's results."""
    first = Run(cfg, log)
    done = []
    for r in range(1, cfg["rounds"] + 1):
        run = first if r == 1 else first.for_round(r)
        if cfg["rounds"] > 1:
            log(f"\n=== round {r}/{cfg['rounds']} (theta {run.theta:g}) in {run.dir}")
        rounds.start_round(run)
        data = credit.credit(run, expand.expand(run))
        roles = train.train(run, data)
        results = evaluate.evaluate(run, trained=bool(roles), base=evaluate.base_results(run))
        summary = json.loads((data / "summary.json").read_text())
        done.append({"round": r, "theta": run.theta, "results": results, "summary": summary,
                     "dir": run.dir})
    _report(first, done, log)
    return done[-1]["results"]


def _report(first: Run, finished: list[dict], log) -> None:
    from malt_fast.eval.evaluate import format_table, seeds_phrase

    cfg, last = first.cfg, finished[-1]
    several = cfg["rounds"] > 1
    log("\n" + "\n".join(credit.format_credit(r["summary"], r["round"] if several else None)
                         for r in finished))
    log(f"\nresults ({last['results']['dataset']}, accuracy in %, mean ± std over "
        f"{seeds_phrase(last['results'])}" + (f", round {cfg['rounds']}" if several else "")
        + "):")
    log(format_table(last["results"]))
    where = [f"\nrun directory: {first.root}"]
    if several:
        summary = rounds.rounds_summary(finished)
        files = rounds.write_rounds(first.root, summary) if ranks.is_main() else {
            "report": first.root / "rounds.md", "plot": first.root / "plots" / "rounds.png"}
        log("\naccuracy per round (round 0 = untrained pipeline):")
        log(rounds.format_rounds(summary))
        where += [f"  rounds: {files['report']}", f"  rounds plot: {files['plot']}"]
    for r in finished:
        tag = f"  round {r['round']} " if several else "  "
        d = r["dir"]
        where += [f"{tag}report: {d / 'eval' / 'report.md'}",
                  f"{tag}plot: {d / 'eval' / 'plots' / 'accuracy.png'}",
                  f"{tag}checkpoints: {d / 'train' / 'checkpoints'}",
                  f"{tag}metrics: {d / 'metrics.jsonl'}"]
    log("\n".join(where))
