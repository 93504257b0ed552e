"""The roles study (benchmarks/results/roles.md): credit recipes x tasks, with role diagnostics.

    .venv/bin/python benchmarks/roles_study.py --stage validation --task arith_d1 \
        --recipes paper correction_flagged --train 24 --heldout 20

Each cell is one `malt-fast run` (expand -> credit -> train -> evaluate) in
runs/roles/{stage}/{task}/{recipe}/. The questions come from the task's TRAINING split only for
`--stage validation`: the first `--train` are trained on, the next `--heldout` (disjoint) are
evaluated, so recipes are chosen without touching the test split; `--stage test` trains on the
same first questions and evaluates the packaged test split. The recipes of a stage share one
expansion where their expansion settings agree (the trees do not depend on the credit
recipe): the first such cell's trees.jsonl is copied into the others; recipes that differ only in evaluation settings also share the credit
and training stages (copied with their stage records; the evaluation reruns). Prints each cell's results table and role diagnostics and writes
runs/roles/{stage}/{task}/summary.json (results.json of every cell: methods, comparisons,
roles, chains).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # name -> (dataset, difficulty)
    "arith_d1": ("arith", 1),
    "arith_d2": ("arith", 2),
    "svamp": ("svamp", 1),
    "asdiv": ("asdiv", 1),
}
# packaged with a test split only: carved in two halves, the first trained and validated on
TEST_ONLY = {"svamp", "asdiv"}
SOLVES = ["prompts=benchmarks/prompts/verifier_solves.yaml"]
RECIPES = {  # name -> (expansion overrides, training overrides, evaluation overrides)
    "paper": ([], [], []),
    "paper_flagged": ([], [], ["evaluate.refine=flagged"]),
    "correction": ([], ["credit.recipe=correction"], []),
    "correction_flagged": ([], ["credit.recipe=correction"], ["evaluate.refine=flagged"]),
    # hypothesis 3: the verifier re-solves the problem and compares answers
    "solves": (SOLVES, [], []),
    "solves_correction": (SOLVES, ["credit.recipe=correction"], []),
    "solves_correction_flagged": (SOLVES, ["credit.recipe=correction"],
                                  ["evaluate.refine=flagged"]),
}


def write_split_files(task: str, n_train: int, n_heldout: int, stage: str, out: Path) -> dict:
    """{train: FILE, test: FILE} of the cell's questions (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    from malt_fast.data import load_split

    dataset, difficulty = TASKS[task]
    if dataset in TEST_ONLY:  # carved: the first half is the training pool, the second the test
        rows = load_split(dataset, "test", difficulty=difficulty)
        train, held_test = rows[:len(rows) // 2], rows[len(rows) // 2:]
    else:
        train = load_split(dataset, "train", difficulty=difficulty)
        held_test = None
    if len(train) < n_train + n_heldout:
        raise SystemExit(f"{task}: {len(train)} training questions, need {n_train + n_heldout}")
    if stage == "validation":
        test = train[n_train:n_train + n_heldout]
    else:
        test = held_test if held_test is not None else \
            load_split(dataset, "test", difficulty=difficulty)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in (("train", train[:n_train]), ("test", test)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": e.id, "dataset": e.dataset,
                                            "question": e.question, "gold": e.gold,
                                            **({"choices": e.choices} if e.choices else {})})
                                + "\n" for e in rows))
        files[name] = str(path)
    return files


def share_training(src: Path, cell: Path) -> None:
    """`src`'s expansion, credit and training (files and stage records) in `cell`: the
    pipeline then skips them there and runs only the evaluation."""
    cell.mkdir(parents=True, exist_ok=True)
    for name in ("trees.jsonl", "metrics.jsonl"):
        shutil.copy(src / name, cell / name)
    for name in ("data", "train"):
        shutil.copytree(src / name, cell / name)
    stages = json.loads((src / "stages.json").read_text())
    stages.pop("evaluate", None)
    (cell / "stages.json").write_text(json.dumps(stages, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["validation", "test"], default="validation")
    ap.add_argument("--task", choices=sorted(TASKS), default="arith_d1")
    ap.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["paper"])
    ap.add_argument("--train", type=int, default=24, help="training questions")
    ap.add_argument("--heldout", type=int, default=20, help="validation questions per seed")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="more config overrides")
    args = ap.parse_args()

    root = ROOT / "runs" / "roles" / args.stage / args.task
    files = write_split_files(args.task, args.train, args.heldout, args.stage, root / "data")
    questions = args.heldout if args.stage == "validation" else 30
    summary_path = root / "summary.json"  # cells of earlier invocations stay in it
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    expanded, trained = {}, {}  # expansion (+ training) overrides -> the cell that ran them
    for recipe in args.recipes:
        cell = root / recipe
        expand_overrides, train_overrides, eval_overrides = RECIPES[recipe]
        first = expanded.get(tuple(expand_overrides))
        twin = trained.get((*expand_overrides, *train_overrides))
        if twin is not None and not (cell / "train").exists():
            share_training(twin, cell)
        elif first is not None and not (cell / "trees.jsonl").exists():
            cell.mkdir(parents=True, exist_ok=True)
            shutil.copy(first / "trees.jsonl", cell / "trees.jsonl")
        overrides = [f"run_dir={cell}", f"dataset={json.dumps(files)}",
                     f"train_questions={args.train}",
                     f"train.seeds={json.dumps(args.train_seeds)}" if len(args.train_seeds) > 1
                     else f"seed={args.train_seeds[0]}",
                     f"evaluate.seeds={json.dumps(args.eval_seeds)}",
                     f"evaluate.questions={questions}", "evaluate.star=true",
                     *expand_overrides, *train_overrides, *eval_overrides, *args.set]
        cmd = [str(ROOT / ".venv" / "bin" / "malt-fast"), "run", str(ROOT / "configs" /
                                                                      "default.yaml")]
        for o in overrides:
            cmd += ["--set", o]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        expanded.setdefault(tuple(expand_overrides), cell)
        trained.setdefault((*expand_overrides, *train_overrides), cell)
        summary[recipe] = json.loads((cell / "eval" / "results.json").read_text())
        summary[recipe]["credit"] = json.loads((cell / "data" / "summary.json").read_text())
        # after every cell: a stopped study keeps what it finished
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"\nwritten: {summary_path}", flush=True)


if __name__ == "__main__":
    main()
