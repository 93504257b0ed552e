"""`malt-fast run CONFIG`: expand -> credit -> train -> evaluate in one run directory.

Each stage is skipped when its outputs are complete and resumed when they are partial:
trees.jsonl skips finished question ids, credit writes summary.json last, training keeps
per-phase checkpoints and `.done` markers, evaluation writes results.json last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from malt_fast.errors import MaltError

DEFAULTS = {
    "model": None,            # HF directory or .gguf; None = packaged SmolLM2-135M-Instruct
    "tokenizer": None,        # defaults to the model path
    "dtype": "float32",
    "threads": 0,
    "seed": 0,
    "dataset": "arith",
    "difficulty": 1,          # for the generated arith task
    "train_split": "train",
    "test_split": "test",
    "train_questions": 24,
    "prompts": None,          # prompts YAML; None = configs/prompts.yaml
    "n": 3,                   # branches per level (paper: 3)
    "chunk_questions": 8,
    "sampling": {"temperature": 0.3, "top_p": 1.0,
                 "max_new_tokens": {"generator": 160, "verifier": 128, "refiner": 160}},
    "engine": {"max_batch": 64, "cache_tokens": 24576},  # KV pool per engine (role)
    "credit": {"theta": 0.5, "pairs": "all", "max_pairs": None},
    "train": {},
    "evaluate": {"seeds": [0, 1, 2], "questions": 30, "chains": 3},
}


def resolve(cfg: dict, source="config") -> dict:
    """Defaults filled in; unknown top-level keys are an error naming the config."""
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"run_dir"})
    if unknown:
        raise MaltError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    out = {}
    for k, v in DEFAULTS.items():
        given = cfg.get(k, v)
        out[k] = {**v, **(given or {})} if isinstance(v, dict) else given
    out["run_dir"] = cfg.get("run_dir", "runs/default")
    return out


class Run:
    def __init__(self, cfg: dict, log=print):
        from malt_fast.data import smollm2_gguf

        self.cfg, self.log = cfg, log
        self.dir = Path(cfg["run_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.dir / "metrics.jsonl"
        self.model_path = cfg["model"] or smollm2_gguf()
        self._model = self._tok = None

    @property
    def model(self):
        if self._model is None:
            from malt_fast.model import load_model

            self._model = load_model(self.model_path, dtype=getattr(torch, self.cfg["dtype"]))
        return self._model

    @property
    def tok(self):
        if self._tok is None:
            from malt_fast.model import load_tokenizer

            self._tok = load_tokenizer(self.cfg["tokenizer"] or self.model_path)
        return self._tok

    def engine(self, adapter=None, progress=True):
        from malt_fast.model.lora import AdapterView
        from malt_fast.rollout import Engine

        e = self.cfg["engine"]
        return Engine(AdapterView(self.model, adapter), self.tok, progress=progress,
                      max_batch=e["max_batch"], cache_tokens=e["cache_tokens"])

    def record(self, stage: str, seconds: float, **extra) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps({"stage": stage, "wall_s": seconds, **extra}) + "\n")

    def examples(self, split):
        from malt_fast.data import load_dataset

        c = self.cfg
        return load_dataset(c["dataset"], split, difficulty=c["difficulty"], seed=c["seed"]) \
            if c["dataset"] == "arith" else load_dataset(c["dataset"], split)

    # ---------------------------------------------------------------- stages

    def expand(self) -> Path:
        from malt_fast.malt.expand import level_sampling, run_expand
        from malt_fast.malt.trees import finished_ids

        c = self.cfg
        train = self.examples(c["train_split"])[: c["train_questions"]]
        if not train:
            raise MaltError(f"{c['dataset']}: the training split is empty")
        path = self.dir / "trees.jsonl"
        if {e.id for e in train} <= finished_ids(path, report=self.log):
            self.log(f"expand: {path} complete, skipped")
            return path
        t0 = time.perf_counter()
        totals = run_expand(train, self.engine(), path, c["n"], level_sampling(c), c["prompts"],
                            c["seed"], c["chunk_questions"], self.metrics, self.log)
        self.record("expand", time.perf_counter() - t0, **totals)
        return path

    def credit(self, trees: Path) -> Path:
        from malt_fast.malt.credit import run_credit

        out = self.dir / "data"
        if (out / "summary.json").is_file():
            self.log(f"credit: {out}/summary.json exists, skipped")
            return out
        t0 = time.perf_counter()
        k = self.cfg["credit"]
        summary = run_credit(trees, out, theta=k["theta"], pairs=k["pairs"],
                             max_pairs=k["max_pairs"], seed=self.cfg["seed"],
                             prompts_path=self.cfg["prompts"])
        self.record("credit", time.perf_counter() - t0, summary=summary)
        return out

    def train(self, data: Path) -> dict:
        import dataclasses

        from malt_fast.train.trainer import TrainConfig, Trainer

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        t = dict(self.cfg["train"])
        unknown = sorted(set(t) - fields)
        if unknown:
            raise MaltError(f"config: unknown train field {unknown[0]!r}")
        if "roles" in t:
            t["roles"] = tuple(t["roles"])
        t.setdefault("seed", self.cfg["seed"])
        t0 = time.perf_counter()
        adapters = Trainer(self.model, self.tok, data, self.dir / "train", TrainConfig(**t),
                           log=self.log).run()
        self.record("train", time.perf_counter() - t0)
        return adapters

    def load_trained_adapters(self) -> bool:
        """Adapters from a finished training stage (for a standalone evaluate)."""
        from malt_fast.model.lora import load_adapter

        ckpt = self.dir / "train" / "checkpoints"
        roles = ("generator", "verifier", "refiner")
        if not all((ckpt / r / "adapter_config.json").is_file() for r in roles):
            return False
        for r in roles:
            if r not in getattr(self.model, "lora_configs", {}):
                load_adapter(self.model, ckpt / r, r)
        return True

    def evaluate(self, trained: bool) -> dict:
        from malt_fast.eval.evaluate import evaluate, write_report
        from malt_fast.malt.expand import level_sampling

        out = self.dir / "eval"
        if (out / "results.json").is_file():
            self.log(f"evaluate: {out}/results.json exists, skipped")
            return json.loads((out / "results.json").read_text())
        c, e = self.cfg, self.cfg["evaluate"]
        test = self.examples(c["test_split"])
        t0 = time.perf_counter()
        base = self.engine(None)
        roles = ("generator", "verifier", "refiner")
        tuned = {r: self.engine(r) for r in roles} if trained else None
        results = evaluate(test, base, tuned, seeds=tuple(e["seeds"]), questions=e["questions"],
                           chains=e["chains"], sampling=level_sampling(c),
                           prompts_path=c["prompts"])
        write_report(results, out)
        self.record("evaluate", time.perf_counter() - t0)
        return results


def run_pipeline(cfg: dict, log=print) -> dict:
    from malt_fast.eval.evaluate import format_table

    run = Run(cfg, log)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    trees = run.expand()
    data = run.credit(trees)
    adapters = run.train(data)
    results = run.evaluate(trained=bool(adapters))
    log("\n" + format_table(results))
    log(f"\nrun directory: {run.dir}\n  report: {run.dir / 'eval' / 'report.md'}\n"
        f"  plot: {run.dir / 'eval' / 'plots' / 'accuracy.png'}\n"
        f"  checkpoints: {run.dir / 'train' / 'checkpoints'}\n  metrics: {run.metrics}")
    return results
