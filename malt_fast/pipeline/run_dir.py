"""One round of a run and its directory: where each stage writes, the record of the settings
each stage's outputs were made with (`stages.json`), the guard that refuses a stale result,
`--restart`, and the metrics log.

Every round lives in RUN_DIR/round-{r}/ with the single-round layout inside; with `rounds: 1`
the stages write directly into RUN_DIR.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from malt_fast import ranks
from malt_fast.config import round_thetas, train_config
from malt_fast.errors import MaltError
from malt_fast.pipeline.models import Models

ROUND_SEED_STRIDE = 1000  # round r samples with seed + 1000 (r - 1): new trees, same pairing rule
STAGES = ("expand", "credit", "train", "evaluate")
# The config fields each stage's outputs depend on (a section name stands for all its fields).
# Speed-only settings (device, threads, engine) are left out: they do not change the result.
STAGE_FIELDS = {
    "expand": ("model", "tokenizer", "dtype", "seed", "dataset", "difficulty", "train_split",
               "train_questions", "prompts", "n", "chunk_questions", "sampling"),
    "credit": ("credit", "prompts"),
    "train": ("train", "deepspeed", "evaluate.star"),
    "evaluate": ("evaluate", "test_split", "sampling", "prompts"),
}
OUTPUTS = {"expand": "trees.jsonl", "credit": "data", "train": "train", "evaluate": "eval"}


def round_dir(run_dir, r: int, rounds: int) -> Path:
    return Path(run_dir) if rounds == 1 else Path(run_dir) / f"round-{r}"


class Run:
    """One round of a run, the context every stage function takes: the config, the round's
    directory, seed and credit threshold, the models shared by every round, and the log."""

    def __init__(self, cfg: dict, log=print, round: int = 1, models: Models | None = None):
        if not 1 <= round <= cfg["rounds"]:
            raise MaltError(f"round {round}: the config has rounds: {cfg['rounds']}")
        self.cfg, self.log, self.round = cfg, log, round
        if cfg["threads"]:  # here, not in run_pipeline: the single-stage commands need it too
            torch.set_num_threads(cfg["threads"])
        self.root = Path(cfg["run_dir"])
        self.dir = round_dir(self.root, round, cfg["rounds"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.dir / "metrics.jsonl"
        self.models = models or Models(cfg)
        self.theta = round_thetas(cfg)[round - 1]
        self.seed = cfg["seed"] + ROUND_SEED_STRIDE * (round - 1)
        self.finetune = train_config(cfg).finetune

    def for_round(self, r: int) -> "Run":
        return Run(self.cfg, self.log, r, self.models)

    def round_dir(self, r: int) -> Path:
        return round_dir(self.root, r, self.cfg["rounds"])

    @property
    def star(self) -> bool:
        """The STaR baseline is trained and evaluated in round 1; later rounds copy its row."""
        return self.cfg["evaluate"]["star"] and self.round == 1

    def record(self, stage: str, seconds: float, **extra) -> None:
        """One line of metrics.jsonl."""
        if not ranks.is_main():  # across ranks, rank 0 writes the stage records
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps({"stage": stage, "round": self.round, "wall_s": seconds,
                                **extra}) + "\n")

    def examples(self, which: str):
        """The training (`which` = "train") or test questions of the run's dataset."""
        from malt_fast.data import load_split

        c = self.cfg
        split = which if isinstance(c["dataset"], dict) else c[f"{which}_split"]
        return load_split(c["dataset"], split, difficulty=c["difficulty"], seed=c["seed"])

    # ---------------------------------------------------------------- stale-result guard

    def stage_outputs(self, stage: str) -> Path:
        return self.dir / OUTPUTS[stage]

    def stage_settings(self, stage: str) -> dict:
        """What `stage`'s outputs were computed from: its config fields (dotted), this round's
        seed and threshold, and the settings key of the stage before it (round r's expansion:
        round r - 1's training), so a change upstream reaches every later stage."""
        fields = {}
        for name in STAGE_FIELDS[stage]:
            node = self.cfg
            for part in name.split("."):
                node = node[part]
            fields.update(_flatten(node, name))
        fields.update({"round.seed": self.seed, "round.theta": self.theta})
        i = STAGES.index(stage)
        if i:
            before = stage_records(self.dir).get(STAGES[i - 1])
        elif self.round > 1:
            before = stage_records(self.round_dir(self.round - 1)).get("train")
        else:
            before = {}
        return {"fields": fields, "upstream": _settings_key(before) if before else None}

    def guard(self, stage: str) -> None:
        """Before `stage` runs, skips or resumes: stop with one line if what it has on disk was
        made with other settings (a stale result would be reused); else record the settings."""
        from malt_fast.malt.trees import atomic_write_text

        records = stage_records(self.dir)
        now, old = self.stage_settings(stage), records.get(stage)
        if old is not None and old != now and self.stage_outputs(stage).exists():
            changed = [f"{k} ({old['fields'].get(k, '-')!r} -> {v!r})"
                       for k, v in now["fields"].items() if old["fields"].get(k, "-") != v]
            if old.get("upstream") != now["upstream"]:
                changed.append("the stage before it (its inputs)")
            raise MaltError(f"{stage}: {self.stage_outputs(stage)} was made with other settings: "
                            f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}; use a "
                            f"new run_dir, or rerun with --restart {stage} (recomputes it and the "
                            "stages after it)")
        records[stage] = now
        if ranks.is_main():  # every rank checks, rank 0 writes
            atomic_write_text(self.dir / "stages.json", json.dumps(records, indent=1) + "\n")

    def finished(self, stage: str, last_file: Path) -> bool:
        """Guard `stage` (above), then whether `last_file`, the file it writes last, exists:
        decided on every rank before any rank writes; a finished stage is logged as skipped."""
        self.guard(stage)
        done = last_file.is_file()
        ranks.barrier()
        if done:
            self.log(f"{stage}: {last_file} exists, skipped")
        return done

    def restart(self, stage: str) -> None:
        """Delete `stage`'s outputs and those of every later stage, in this round and later
        ones, so the next run recomputes them."""
        from malt_fast.malt.trees import atomic_write_text

        ranks.barrier()  # every rank has built its Run (and read stages.json) before rank 0 deletes
        for r in range(self.round, self.cfg["rounds"] + 1) if ranks.is_main() else ():
            run = self if r == self.round else self.for_round(r)
            first = STAGES.index(stage) if r == self.round else 0
            records = stage_records(run.dir)
            for s in STAGES[first:]:
                out = run.stage_outputs(s)
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
                records.pop(s, None)
            if run.dir.is_dir():
                atomic_write_text(run.dir / "stages.json", json.dumps(records, indent=1) + "\n")
        ranks.barrier()
        self.log(f"restart: {stage} and the stages after it will be recomputed")


def _flatten(node, prefix: str) -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def stage_records(folder: Path) -> dict:
    """A round directory's stages.json: stage -> the settings its outputs were made with."""
    path = Path(folder) / "stages.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MaltError(f"{path}: not valid JSON (the record of each stage's settings); delete "
                        "it to accept what is on disk, or use a new run_dir") from None


def _settings_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
