"""The evaluate stage: the test questions -> RUN_DIR/eval/ (results.json, report.md, plots).
SA, SA+MV@3, MA, MA+MV@3, and with trained roles MALT, MALT+MV@3 and STaR, over the seeds.

The untrained methods are one part per evaluation seed (eval/seeds/seed-S.json), the trained
ones one part per training and evaluation seed (trained-T-seed-S.json). The parts of a group
(the untrained methods; one training seed's) are computed together, every pending seed's chains
in one engine run per method, and written when the group ends: a killed evaluation resumes at
its first unfinished group. Across ranks the groups are shared out. With several training seeds
a trained method's seed key is "T/S"."""

from __future__ import annotations

import json
import time
from pathlib import Path

from malt_fast import ranks
from malt_fast.config import STAR
from malt_fast.phases import phase
from malt_fast.pipeline.run_dir import Run
from malt_fast.pipeline.train import checkpoints, training_seeds


def evaluate(run: Run, trained: bool, base: dict | None = None) -> dict:
    """The evaluation of this round; with `base` (round 1's results) only the trained methods
    run and the untrained ones are copied from `base`."""
    from malt_fast.eval.evaluate import write_report

    out = run.dir / "eval"
    if run.finished("evaluate", out / "results.json"):
        return json.loads((out / "results.json").read_text())
    if base is not None and not trained:
        base = None  # nothing trained to evaluate: fall back to the full evaluation
    t0 = time.perf_counter()
    with phase("evaluate", absorb=True):
        groups = _groups(run, out, trained, base is None)
        parts = [p for i, (paths, compute) in enumerate(groups)
                 for p in _group(i, paths, compute)]
        if ranks.world() > 1:  # every part is on disk: each rank reads the others' parts
            mine = [p for p in parts if not isinstance(p, Path)]
            ranks.barrier()
            parts = [json.loads(p.read_text()) if isinstance(p, Path) else p for p in parts]
        results = combine_seeds(parts, run.cfg["evaluate"], base)
        results["training_seeds"] = [x for x in training_seeds(run) if x is not None]
        if ranks.is_main():
            write_report(results, out)
    extra = {}
    if ranks.world() > 1:
        extra = dict(world_size=ranks.world(), per_rank=ranks.gather(
            {"parts": len(mine), "wall_s": time.perf_counter() - t0}))
    record_rollouts(run, parts, time.perf_counter() - t0, **extra)
    if ranks.world() > 1:
        ranks.barrier()  # results.json is written before any rank goes on
    return results


def _groups(run: Run, out: Path, trained: bool, untrained: bool) -> list:
    """[(seed -> part file, compute(pending seeds) -> seed -> part)] in evaluation order:
    the untrained methods (unless copied from round 1), then each training seed's."""
    from malt_fast.eval.evaluate import evaluate_seeds
    from malt_fast.malt.expand import level_sampling

    c, e = run.cfg, run.cfg["evaluate"]
    test = run.examples("test")
    kw = dict(questions=e["questions"], chains=e["chains"], sampling=level_sampling(c),
              prompts_path=c["prompts"], refine=e["refine"])
    groups = []
    if untrained:
        def untrained_part(seeds):
            return evaluate_seeds(test, run.models.engine(None), seeds=seeds, **kw)
        groups.append(({s: out / "seeds" / f"seed-{s}.json" for s in e["seeds"]},
                       untrained_part))
    for t in training_seeds(run) if trained else []:
        def trained_part(seeds, t=t):
            run.models.use_roles(checkpoints(run, t))
            tuned = run.models.role_engines((STAR,) if run.star else ())
            star = tuned.pop(STAR, None)
            parts = evaluate_seeds(test, None, tuned, star, seeds=seeds, **kw)
            if t is not None:
                for r in parts.values():
                    for field in ("per_question", "chains"):
                        r[field] = {m: {f"{t}/{k}": v for k, v in q.items()}
                                    for m, q in r[field].items()}
            return parts
        name = "trained" if t is None else f"trained-{t}"
        groups.append(({s: out / "seeds" / f"{name}-seed-{s}.json" for s in e["seeds"]},
                       trained_part))
    return groups


def _group(index: int, paths: dict, compute) -> list:
    """The parts of one group (its seeds' files): computed together, every pending seed's
    chains in one engine run per method. Group i is rank i % N's (all of them in one process);
    another rank's group: its paths, read once every rank is done."""
    from malt_fast.malt.trees import atomic_write_text

    if not ranks.mine(index):
        return list(paths.values())
    done = {}
    for seed, path in paths.items():
        if path.is_file():
            part = json.loads(path.read_text())
            # parts of older versions lack per-question or per-chain records: redone
            if "per_question" in part and isinstance(part.get("chains"), dict):
                done[seed] = part
    todo = [seed for seed in paths if seed not in done]
    if todo:
        for seed, part in compute(todo).items():
            atomic_write_text(paths[seed], json.dumps(part) + "\n")
            done[seed] = part
    return [done[seed] for seed in paths]


def base_results(run: Run) -> dict | None:
    """Round 1's results, whose untrained methods (SA, MA, ...) later rounds reuse: the base
    model and the evaluation seeds do not change between rounds."""
    if run.round == 1:
        return None
    path = run.round_dir(1) / "eval" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def record_rollouts(run: Run, parts: list[dict], seconds: float, **extra) -> None:
    """One evaluate record per pipeline run (MA: SA too; STaR; MALT) with its engine counts
    summed over the parts: prefill_tokens computed, context_tokens without reuse."""
    from malt_fast.eval.evaluate import ROLLOUT_METHODS, add_rollout

    rollout: dict = {}
    for p in parts:
        for name, stats in p.get("rollout", {}).items():
            add_rollout(rollout, name, stats)
    if not rollout:  # every part was computed by an older version
        run.record("evaluate", seconds, **extra)
    for name, stats in rollout.items():
        run.record("evaluate", stats["wall_s"], method=name,
                   methods=list(ROLLOUT_METHODS[name]), evaluate_wall_s=seconds,
                   **{k: v for k, v in stats.items() if k != "wall_s"}, **extra)


def combine_seeds(parts: list[dict], e: dict, base: dict | None = None) -> dict:
    """Per-seed evaluate() results -> the results of one evaluate() over all the seeds (same
    numbers: the per-question and per-chain records are merged, accuracies, comparisons and
    counts recomputed). With `base` (round 1's results) the untrained methods are round 1's.
    The engine counts (wall times) are left out: results.json is then the same file whether
    one process or several ranks computed it."""
    from malt_fast.eval.evaluate import merge_seeds

    common = {"dataset": parts[0]["dataset"], "questions": e["questions"],
              "chains_per_question": e["chains"]}
    if base is not None:
        parts = [{**base, "transitions": {"MA": base["transitions"]["MA"]},
                  "per_question": {m: q for m, q in base["per_question"].items()
                                   if not m.startswith("MALT")},
                  "chains": {"MA": base.get("chains", {}).get("MA", {})}}] + parts
    results = merge_seeds([{**p, **common} for p in parts], seeds=e["seeds"])
    results.pop("rollout", None)
    return results
