"""`malt-fast run CONFIG`: expand -> credit -> train -> evaluate in one run directory.

Each stage is skipped when its outputs are complete and resumed when they are partial:
trees.jsonl skips finished question ids, credit writes summary.json last, training is complete
once every role is exported and resumes from its checkpoints otherwise, evaluation keeps one file
per finished seed and writes results.json last. So a run killed at any moment and started again
with the same command ends with the same files as a run that was never interrupted
(docs/pipeline.md).

Iterative MALT (`rounds: k`, k > 1) repeats expand -> credit -> train k times. Round r + 1
expands with round r's trained roles (one engine per role, each through its own adapter or, with
full fine-tuning, its own model), and its training continues from those weights; the credit
threshold follows `credit.theta_schedule`.

With a `deepspeed:` entry the train stage runs as `deepspeed.nproc` processes under torchrun
(`malt-fast train` on a generated config, one DeepSpeed engine per role); the other stages stay
in this process. Started under torchrun itself, every stage runs on the launcher's ranks:
expansion chunks and evaluation parts are shared out, rank 0 merges them and writes the records,
and the DeepSpeed train stage runs in the ranks' own processes (malt_fast/ranks.py,
docs/distributed.md).

Every round lives in RUN_DIR/round-{r}/ with the single-round layout inside; RUN_DIR/rounds.md,
rounds.json and plots/rounds.png compare the rounds. With `rounds: 1` the stages write directly
into RUN_DIR, as they always have.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from malt_fast import ranks
from malt_fast.config import STAR, round_thetas, run_dict, train_config
from malt_fast.errors import MaltError
from malt_fast.model.dtypes import placement

ROLES = ("generator", "verifier", "refiner")

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


def resolve(cfg: dict, source="config") -> dict:
    """The run config checked against its schema (malt_fast.config): defaults filled in, a bad
    field a MaltError naming `source` and the field. A DeepSpeed JSON is checked now too, not
    after an expansion that may take hours."""
    out = run_dict(cfg, source)
    if out["deepspeed"] is not None:
        from malt_fast.train.distributed import parse_spec, read_ds_config, resolve_ds_config

        spec = parse_spec(out["deepspeed"], source)
        resolve_ds_config(read_ds_config(spec.config), spec.config, train_config(out),
                          spec.nproc, cuda=torch.cuda.is_available())
    return out


def check_inputs(cfg: dict, source="config") -> dict:
    """Every path the run will read, resolved and checked without loading any weights: the model
    and tokenizer exist, the dataset's splits load and share no question, the prompts parse for
    the dataset's family. Returns {model, tokenizer, prompts, train_questions,
    test_questions}; a problem is a MaltError naming `source` and the field."""
    from malt_fast.data import check_disjoint, load_split, smollm2_gguf
    from malt_fast.malt.prompts import DEFAULT_PATH, load_prompts, prompt_family

    def model_path(field, value):
        path = Path(value)
        if not (path.is_dir() and (path / "config.json").is_file()
                or path.is_file() and path.suffix == ".gguf"):
            raise MaltError(f"{source}: field '{field}': {value} is not a Hugging Face model "
                            "directory (config.json) or a .gguf file")
        return path

    def tokenizer_path(value):
        path = Path(value)
        files = ("tokenizer.json", "tokenizer.model")
        if not (path.is_file() and path.suffix == ".gguf"
                or path.is_dir() and any((path / f).is_file() for f in files)):
            raise MaltError(f"{source}: field 'tokenizer': {value} has no tokenizer.json or "
                            "tokenizer.model (nor is it a .gguf file)")
        return path

    model = model_path("model", cfg["model"]) if cfg["model"] else smollm2_gguf()
    tokenizer = tokenizer_path(cfg["tokenizer"] or model)
    ds = cfg["dataset"]
    split = {w: w if isinstance(ds, dict) else cfg[f"{w}_split"] for w in ("train", "test")}
    try:
        train, test = (load_split(ds, split[w], difficulty=cfg["difficulty"], seed=cfg["seed"])
                       for w in ("train", "test"))
    except MaltError as e:
        raise MaltError(f"{source}: field 'dataset': {e}") from None
    check_disjoint(train, test, f"{source}: field 'dataset'")
    if not train or not test:
        raise MaltError(f"{source}: field 'dataset': the {'training' if not train else 'test'} "
                        "split is empty")
    prompts = Path(cfg["prompts"]) if cfg["prompts"] else DEFAULT_PATH
    try:
        load_prompts(prompts, prompt_family(train[0].dataset, train[0].choices))
    except MaltError as e:
        raise MaltError(f"{source}: field 'prompts': {e}") from None
    return {"model": str(model), "tokenizer": str(tokenizer), "prompts": str(prompts),
            "train_questions": len(train), "test_questions": len(test)}


def round_dir(run_dir, r: int, rounds: int) -> Path:
    return Path(run_dir) if rounds == 1 else Path(run_dir) / f"round-{r}"


class _Models:
    """The base model and tokenizer, loaded once and shared by every round's Run, and with full
    fine-tuning the trained role models the engines decode with."""

    def __init__(self, cfg):
        from malt_fast.data import smollm2_gguf

        self.cfg = cfg
        self.path = cfg["model"] or smollm2_gguf()
        self.model = self.tok = None
        self.roles: dict = {}  # full fine-tuning: role -> its trained model

    def release(self) -> None:
        """Drop the models (the base loads again on next use), e.g. so that a training
        subprocess gets the memory."""
        self.model, self.roles = None, {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Run:
    """One round's stages in its directory (RUN_DIR itself when there is one round)."""

    def __init__(self, cfg: dict, log=print, round: int = 1, models: _Models | None = None):
        if not 1 <= round <= cfg["rounds"]:
            raise MaltError(f"round {round}: the config has rounds: {cfg['rounds']}")
        self.cfg, self.log, self.round = cfg, log, round
        if cfg["threads"]:  # here, not in run_pipeline: the single-stage commands need it too
            torch.set_num_threads(cfg["threads"])
        self.root = Path(cfg["run_dir"])
        self.dir = round_dir(self.root, round, cfg["rounds"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.dir / "metrics.jsonl"
        self.models = models or _Models(cfg)
        self.model_path = self.models.path
        self.theta = round_thetas(cfg)[round - 1]
        self.seed = cfg["seed"] + ROUND_SEED_STRIDE * (round - 1)
        self.finetune = train_config(cfg).finetune

    def for_round(self, r: int) -> "Run":
        return Run(self.cfg, self.log, r, self.models)

    @property
    def model(self):
        if self.models.model is None:
            from malt_fast.model import load_model

            model = load_model(self.model_path, *self.placement())
            self.tok.check_fits(model.config.vocab_size, self.model_path)
            self.models.model = model
        return self.models.model

    def placement(self) -> tuple:
        dtype, device = placement(self.cfg["dtype"], self.cfg["device"], "config")
        return dtype, ranks.device(device)  # across ranks, rank r decodes on cuda:LOCAL_RANK

    @property
    def tok(self):
        if self.models.tok is None:
            from malt_fast.model import load_tokenizer

            self.models.tok = load_tokenizer(self.cfg["tokenizer"] or self.model_path)
        return self.models.tok

    def engine(self, adapter=None, progress=True, model=None):
        """An engine on `model` (default: the base) seen through `adapter` (None: no adapter).
        With engine.merge_adapters the engine decodes a merged copy of the adapted projections
        (faster; one more copy of them per engine), else through the LoRA wrappers."""
        from malt_fast.model.lora import AdapterView, merged_model

        e = self.cfg["engine"]
        model = self.model if model is None else model
        view = merged_model(model, adapter) if e["merge_adapters"] else AdapterView(model, adapter)
        return self._engine(view, progress)

    def _engine(self, model, progress=True):
        from malt_fast.rollout import Engine

        e = self.cfg["engine"]
        return Engine(model, self.tok, progress=progress, max_batch=e["max_batch"],
                      cache_tokens=e["cache_tokens"])

    def role_engine(self, role: str):
        """An engine decoding with `role`'s trained weights: its adapter on the shared base
        (LoRA) or its own model (full fine-tuning); the base for a role that has none (e.g. one
        left out of train.roles)."""
        if role in self.models.roles:
            return self.engine(model=self.models.roles[role])
        return self.engine(role if role in getattr(self.model, "lora_configs", {}) else None)

    def role_engines(self, extra: tuple = ()) -> dict:
        """role -> what decodes it, for the three roles and `extra` ones (e.g. STaR's agent).

        Trained LoRA roles with engine.multi_adapter share one engine whose batches mix rows
        of every adapter (role -> (engine, adapter)); otherwise each role has its own engine."""
        roles = list(ROLES) + list(extra)
        lora = getattr(self.model, "lora_configs", {})
        adapters = {r: r if r in lora else None for r in roles}
        if self.cfg["engine"]["multi_adapter"] and not self.models.roles and any(adapters.values()):
            from malt_fast.model.lora import MultiAdapterView

            names = [None] + [r for r in roles if adapters[r]]
            view = MultiAdapterView(self.model, names,
                                    max_rows=max(1024, self.cfg["engine"]["max_batch"]))
            engine = self._engine(view)
            return {r: (engine, adapters[r]) for r in roles}
        return {r: self.role_engine(r) for r in roles}

    def record(self, stage: str, seconds: float, **extra) -> None:
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

    # ---------------------------------------------------------------- rounds

    def previous_checkpoints(self) -> Path | None:
        if self.round == 1:
            return None
        return round_dir(self.root, self.round - 1, self.cfg["rounds"]) / "train" / "checkpoints"

    def start_round(self) -> None:
        """Round r >= 2: load round r - 1's trained roles, which this round expands with and
        trains on from. Done whether or not this round's expansion is already complete, so a
        resumed run trains from the same weights as an uninterrupted one."""
        from malt_fast.malt.trees import atomic_write_text

        if self.cfg["rounds"] == 1:
            return
        prev = self.previous_checkpoints()
        loaded = self.use_roles(prev) if prev is not None else []
        info = {"round": self.round, "theta": self.theta, "seed": self.seed,
                "adapters_from": str(prev) if prev is not None else None,
                "roles_from_adapters": loaded}
        if ranks.is_main():
            atomic_write_text(self.dir / "round.json", json.dumps(info, indent=2) + "\n")

    # ---------------------------------------------------------------- stale-result guard

    def stage_outputs(self, stage: str) -> Path:
        return {"expand": self.dir / "trees.jsonl", "credit": self.dir / "data",
                "train": self.dir / "train", "evaluate": self.dir / "eval"}[stage]

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
            before = _stage_records(self.dir).get(STAGES[i - 1])
        elif self.round > 1:
            before = _stage_records(round_dir(self.root, self.round - 1,
                                              self.cfg["rounds"])).get("train")
        else:
            before = {}
        return {"fields": fields, "upstream": _settings_key(before) if before else None}

    def guard(self, stage: str) -> None:
        """Before `stage` runs, skips or resumes: stop with one line if what it has on disk was
        made with other settings (a stale result would be reused); else record the settings."""
        from malt_fast.malt.trees import atomic_write_text

        records = _stage_records(self.dir)
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

    def restart(self, stage: str) -> None:
        """Delete `stage`'s outputs and those of every later stage, in this round and later
        ones, so the next run recomputes them."""
        import shutil

        ranks.barrier()  # every rank has built its Run (and read stages.json) before rank 0 deletes
        for r in range(self.round, self.cfg["rounds"] + 1) if ranks.is_main() else ():
            run = self if r == self.round else self.for_round(r)
            first = STAGES.index(stage) if r == self.round else 0
            records = _stage_records(run.dir)
            for s in STAGES[first:]:
                out = run.stage_outputs(s)
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
                records.pop(s, None)
            if run.dir.is_dir():
                from malt_fast.malt.trees import atomic_write_text

                atomic_write_text(run.dir / "stages.json", json.dumps(records, indent=1) + "\n")
        ranks.barrier()
        self.log(f"restart: {stage} and the stages after it will be recomputed")

    # ---------------------------------------------------------------- stages

    def expand(self) -> Path:
        from malt_fast.malt.expand import (level_sampling, merge_rank_parts, parts_finished_ids,
                                           rank_part, rank_parts, run_expand)
        from malt_fast.malt.trees import finished_ids

        c = self.cfg
        self.guard("expand")
        train = self.examples("train")[: c["train_questions"]]
        if not train:
            raise MaltError(f"{c['dataset']}: the training split is empty")
        path = self.dir / "trees.jsonl"
        complete = {e.id for e in train} <= finished_ids(path, report=self.log)
        # across ranks (or resuming what ranks left): every rank writes its chunks to its own
        # part, rank 0 merges them into trees.jsonl (docs/distributed.md)
        parts = ranks.world() > 1 or bool(rank_parts(path))
        ranks.barrier()  # every rank has decided before rank 0 writes anything
        if complete:
            if parts and ranks.is_main():  # a merge cut short after trees.jsonl was written
                merge_rank_parts(path, [e.id for e in train], self.log)
            self.log(f"expand: {path} complete, skipped")
            ranks.barrier()
            return path
        # round 1 shares one engine across roles (shared-prefix rollout); later rounds have a
        # trained adapter per role, so each role decodes through its own weights
        engines = self.engine() if self.round == 1 else self.role_engines()
        t0 = time.perf_counter()
        if not parts:
            totals = run_expand(train, engines, path, c["n"], level_sampling(c), c["prompts"],
                                self.seed, c["chunk_questions"], self.metrics, self.log)
        else:
            done = parts_finished_ids(path, self.log)
            ranks.barrier()  # every rank has read what is done before any rank writes
            totals = run_expand(train, engines, rank_part(path, ranks.rank()), c["n"],
                                level_sampling(c), c["prompts"], self.seed, c["chunk_questions"],
                                self.metrics, self.log, shard=(ranks.rank(), ranks.world()),
                                done=done)
            per_rank = ranks.gather(totals)
            if ranks.is_main():
                merge_rank_parts(path, [e.id for e in train], self.log)
                # tokens summed over the ranks, wall time the slowest rank's
                totals = {k: sum(t[k] for t in per_rank)
                          for k in ("questions", "generated_tokens", "prefill_tokens")}
                totals["wall_s"] = max(t["wall_s"] for t in per_rank)
                totals["tokens_per_s"] = totals["generated_tokens"] / max(totals["wall_s"], 1e-9)
                totals.update(world_size=ranks.world(), per_rank=per_rank)
        self.record("expand", time.perf_counter() - t0, adapters=str(self.previous_checkpoints()),
                    **totals)
        ranks.barrier()  # trees.jsonl is merged before any rank goes on
        return path

    def credit(self, trees: Path) -> Path:
        from malt_fast.malt.credit import Recipe, run_credit

        out = self.dir / "data"
        self.guard("credit")
        done = (out / "summary.json").is_file()
        ranks.barrier()  # every rank has decided before rank 0 writes
        if done:
            self.log(f"credit: {out}/summary.json exists, skipped")
            return out
        if ranks.is_main():  # across ranks, rank 0 alone (it is quick)
            t0 = time.perf_counter()
            k = self.cfg["credit"]
            recipe = Recipe(k["recipe"], k["verdict_weight"], k["copy_share"])
            summary = run_credit(trees, out, theta=self.theta, pairs=k["pairs"],
                                 max_pairs=k["max_pairs"], seed=self.seed,
                                 prompts_path=self.cfg["prompts"], cut_replies=k["cut_replies"],
                                 log=self.log, recipe=recipe)
            self.record("credit", time.perf_counter() - t0, summary=summary)
        ranks.barrier()
        return out

    def train(self, data: Path) -> list[str]:
        """Train the roles, in this process or under torchrun (`deepspeed:`), once per training
        seed (`train.seeds`, else one run), skipping each seed whose roles are all exported; then
        make the trained roles the ones that role_engines() decodes with (the last seed's).
        Returns those roles."""
        self.guard("train")
        for t in self.training_seeds():
            done = self.trained(t=t)
            ranks.barrier()  # every rank has decided before any rank trains
            if done:
                self.log(f"train: {self.checkpoints(t)} complete, skipped")
            else:
                from malt_fast.train.trainer import Trainer

                cfg = self.train_cfg(t)
                t0 = time.perf_counter()
                if self.cfg["deepspeed"] is not None:
                    self.train_deepspeed(data, cfg, self.train_dir(t))
                elif ranks.is_main():  # across ranks without DeepSpeed: rank 0 trains alone
                    self.models.roles = {}  # full: the trainer loads each role's start itself
                    Trainer(self.model, self.tok, data, self.train_dir(t), cfg, log=self.log,
                            init_from=self.previous_checkpoints()).run()
                self.record("train", time.perf_counter() - t0, training_seed=cfg.seed)
            if self.star and ranks.is_main():
                self.train_star(data, t)
            ranks.barrier()  # the roles are exported before any rank loads them
        return self.use_roles(self.checkpoints(t))

    def training_seeds(self) -> list:
        """`train.seeds`, or [None]: one training run with train.seed (else the round's seed)."""
        return list(self.cfg["train"]["seeds"] or [None])

    def train_cfg(self, t=None):
        cfg = train_config(self.cfg, seed=self.seed)
        return cfg if t is None else cfg.model_copy(update={"seed": t})

    def train_dir(self, t=None) -> Path:
        """Where training seed t trains (RUN_DIR/train, or RUN_DIR/train/seed-T with seeds)."""
        return self.dir / "train" if t is None else self.dir / "train" / f"seed-{t}"

    def train_star(self, data: Path, t=None) -> None:
        """The STaR baseline's single agent, trained in this process like a fourth role (SFT on
        sft_star.jsonl, the run's finetune mode), unless it is exported already."""
        if self.trained((STAR,), t):
            return
        from malt_fast.train.trainer import Trainer

        cfg = self.train_cfg(t).model_copy(update={"roles": (STAR,)})
        t0 = time.perf_counter()
        Trainer(self.model, self.tok, data, self.train_dir(t), cfg, log=self.log).run()
        self.record("train_star", time.perf_counter() - t0, training_seed=cfg.seed)

    def train_deepspeed(self, data: Path, cfg, out: Path) -> None:
        """`deepspeed.nproc` processes under torchrun, each running `malt-fast train` on a config
        written here (one DeepSpeed engine per role, docs/distributed.md). This process drops its
        models first, as the ranks load their own. A killed stage resumes from DeepSpeed's
        checkpoints when rerun."""
        from malt_fast.malt.trees import atomic_write_text
        from malt_fast.train.distributed import free_port, parse_spec

        spec = parse_spec(self.cfg["deepspeed"], "config")
        job = {"model": str(self.model_path), "tokenizer": str(self.cfg["tokenizer"] or
                                                              self.model_path),
               "dtype": self.cfg["dtype"], "data": str(data), "out": str(out),
               "train": cfg.model_dump(mode="json"), "deepspeed": str(spec.config)}
        if self.previous_checkpoints() is not None:
            job["init"] = str(self.previous_checkpoints())
        out.mkdir(parents=True, exist_ok=True)
        path = out / "deepspeed-job.yaml"
        if ranks.is_main():
            atomic_write_text(path, json.dumps(job, indent=1) + "\n")  # JSON is YAML
        ranks.barrier()
        self.models.release()
        if ranks.world() > 1:  # already under torchrun: these ranks train, nothing is launched
            self.train_here(path, spec)
            return
        env = dict(os.environ)
        if self.cfg["threads"]:
            env["OMP_NUM_THREADS"] = str(self.cfg["threads"])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(spec.nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "malt_fast.cli", "train", str(path)]
        self.log(f"train: torchrun --nproc_per_node {spec.nproc} -m malt_fast.cli train {path}")
        rc = subprocess.run(cmd, env=env, preexec_fn=_die_with_parent).returncode
        if rc != 0:
            raise MaltError(f"{path}: the DeepSpeed train stage failed (torchrun exit status "
                            f"{rc}, its error is above); rerunning resumes it")

    def train_here(self, job: Path, spec) -> None:
        """The train stage of a run already under torchrun (`torchrun ... malt_fast.cli run`):
        every rank runs `malt-fast train` on the job in this process, in the ranks' group
        (deepspeed.nproc is not used: the ranks are the launcher's)."""
        from malt_fast.config import read_yaml
        from malt_fast.train.distributed import train_from_config

        if spec.nproc != ranks.world():
            self.log(f"train: {ranks.world()} ranks (the launcher's), not deepspeed.nproc "
                     f"{spec.nproc}")
        self.log(f"train: {ranks.world()} ranks in this run's group, malt-fast train {job}")
        train_from_config(read_yaml(job), str(job))

    @property
    def star(self) -> bool:
        """The STaR baseline is trained and evaluated in round 1; later rounds copy its row."""
        return self.cfg["evaluate"]["star"] and self.round == 1

    def checkpoints(self, t=None) -> Path:
        return self.train_dir(t) / "checkpoints"

    def trained(self, roles=None, t=None) -> bool:
        """Every role of `roles` (default train.roles) exported by training seed t (an export
        writes its config file last)."""
        marker = "adapter_config.json" if self.finetune == "lora" else "config.json"
        roles = train_config(self.cfg).roles if roles is None else roles
        return all((self.checkpoints(t) / r / marker).is_file() for r in roles)

    def load_trained(self) -> bool:
        """This round's trained roles (the last training seed's), if its training stage
        finished for every training seed (a standalone evaluate); roles left out of train.roles
        decode with the base."""
        seeds = self.training_seeds()
        if not all(self.trained(t=t) for t in seeds):
            return False
        self.use_roles(self.checkpoints(seeds[-1]))
        return True

    def use_roles(self, ckpt_dir) -> list[str]:
        """Make the trained roles in ckpt_dir/{role}/ the ones role_engines() decodes with: PEFT
        adapters copied into the shared base (LoRA), or HF models loaded (full fine-tuning).
        Returns the roles found."""
        from malt_fast.errors import fail
        from malt_fast.model import load_model

        if self.finetune == "lora":
            return use_adapters(self.model, ckpt_dir)
        ckpt_dir = Path(ckpt_dir)
        roles = [r for r in ROLES + (STAR,) if (ckpt_dir / r / "config.json").is_file()]
        if not roles:
            raise fail(ckpt_dir, "no trained role models here (is the previous round finished?)")
        self.models.roles = {}  # the old ones go before the new ones load
        gc.collect()
        for r in roles:
            self.models.roles[r] = load_model(ckpt_dir / r, *self.placement())
        return roles

    def base_results(self) -> dict | None:
        """Round 1's results, whose untrained methods (SA, MA, ...) later rounds reuse: the
        base model and the evaluation seeds do not change between rounds."""
        if self.round == 1:
            return None
        path = round_dir(self.root, 1, self.cfg["rounds"]) / "eval" / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def evaluate(self, trained: bool, base: dict | None = None) -> dict:
        """SA, SA+MV@3, MA, MA+MV@3 (and MALT, MALT+MV@3, STaR when `trained`) over the seeds.

        The untrained methods are one part per evaluation seed (eval/seeds/seed-S.json), the
        trained ones one part per training and evaluation seed (trained-T-seed-S.json). The
        parts of a group (the untrained methods; one training seed's) are computed together,
        every pending seed's chains in one engine run per method, and written when the group
        ends: a killed evaluation resumes at its first unfinished group. Across ranks the
        groups are shared out. With several training seeds a trained method's seed key is
        "T/S". With `base` (round 1's results) only the trained
        methods run and the untrained ones are copied from `base`."""
        from malt_fast.eval.evaluate import evaluate_seeds, write_report
        from malt_fast.malt.expand import level_sampling
        from malt_fast.malt.trees import atomic_write_text

        out = self.dir / "eval"
        self.guard("evaluate")
        done = (out / "results.json").is_file()
        ranks.barrier()  # every rank has decided before rank 0 writes
        if done:
            self.log(f"evaluate: {out}/results.json exists, skipped")
            return json.loads((out / "results.json").read_text())
        c, e = self.cfg, self.cfg["evaluate"]
        if base is not None and not trained:
            base = None  # nothing trained to evaluate: fall back to the full evaluation
        test = self.examples("test")
        t0 = time.perf_counter()
        kw = dict(questions=e["questions"], chains=e["chains"], sampling=level_sampling(c),
                  prompts_path=c["prompts"], refine=e["refine"])

        def group(index: int, paths: dict, compute) -> list:
            """The parts of one group (its seeds' files): computed together, every pending
            seed's chains in one engine run per method. Group i is rank i % N's (all of them
            in one process); another rank's group: its paths, read once every rank is done."""
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

        groups, engine = [], {}  # engines are built when a group needs them
        if base is None:
            def untrained(seeds):
                engine["base"] = self.engine(None)
                return evaluate_seeds(test, engine.pop("base"), seeds=seeds, **kw)
            groups.append(({s: out / "seeds" / f"seed-{s}.json" for s in e["seeds"]}, untrained))
        for t in self.training_seeds() if trained else []:
            def trained_part(seeds, t=t):
                self.use_roles(self.checkpoints(t))
                tuned = self.role_engines((STAR,) if self.star else ())
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
        parts = [p for i, (paths, compute) in enumerate(groups) for p in group(i, paths, compute)]
        if ranks.world() > 1:  # every part is on disk: each rank reads the others' parts
            mine = [p for p in parts if not isinstance(p, Path)]
            ranks.barrier()
            parts = [json.loads(p.read_text()) if isinstance(p, Path) else p for p in parts]
        results = combine_seeds(parts, e, base)
        results["training_seeds"] = [x for x in self.training_seeds() if x is not None]
        if ranks.is_main():
            write_report(results, out)
        extra = {}
        if ranks.world() > 1:
            extra = dict(world_size=ranks.world(), per_rank=ranks.gather(
                {"parts": len(mine), "wall_s": time.perf_counter() - t0}))
        self.record_rollouts(parts, time.perf_counter() - t0, **extra)
        if ranks.world() > 1:
            ranks.barrier()  # results.json is written before any rank goes on
        return results

    def record_rollouts(self, parts: list[dict], seconds: float, **extra) -> None:
        """One evaluate record per pipeline run (MA: SA too; STaR; MALT) with its engine counts
        summed over the parts: prefill_tokens computed, context_tokens without reuse."""
        from malt_fast.eval.evaluate import ROLLOUT_METHODS, add_rollout

        rollout: dict = {}
        for p in parts:
            for name, stats in p.get("rollout", {}).items():
                add_rollout(rollout, name, stats)
        if not rollout:  # every part was computed by an older version
            self.record("evaluate", seconds, **extra)
        for name, stats in rollout.items():
            self.record("evaluate", stats["wall_s"], method=name,
                        methods=list(ROLLOUT_METHODS[name]), evaluate_wall_s=seconds,
                        **{k: v for k, v in stats.items() if k != "wall_s"}, **extra)


def _flatten(node, prefix: str) -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def _stage_records(folder: Path) -> dict:
    path = Path(folder) / "stages.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MaltError(f"{path}: not valid JSON (the record of each stage's settings); delete "
                        "it to accept what is on disk, or use a new run_dir") from None


def _settings_key(record: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _die_with_parent() -> None:
    """In the torchrun child: be sent SIGTERM when `malt-fast run` dies (also by SIGKILL), so an
    orphaned training job never races the rerun that resumes it."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def use_adapters(model, ckpt_dir) -> list[str]:
    """Make the model's role adapters equal the PEFT adapters in ckpt_dir/{role}/: loaded when
    the model lacks the role's adapter, copied into it when it has one. Returns the roles."""
    from safetensors.torch import load_file

    from malt_fast.errors import fail
    from malt_fast.model.lora import adapter_state_dict, load_adapter, set_adapter

    ckpt_dir = Path(ckpt_dir)
    roles = [r for r in ROLES + (STAR,) if (ckpt_dir / r / "adapter_config.json").is_file()]
    if not roles:
        raise fail(ckpt_dir, "no trained role adapters here (is the previous round finished?)")
    for role in roles:
        if role not in getattr(model, "lora_configs", {}):
            load_adapter(model, ckpt_dir / role, role)
            continue
        weights = ckpt_dir / role / "adapter_model.safetensors"
        state = load_file(str(weights))
        target = adapter_state_dict(model, role)  # detached views of the live parameters
        if set(state) != set(target):
            raise fail(weights, f"its tensors do not match the model's {role} adapter")
        with torch.no_grad():
            for k, t in state.items():
                if t.shape != target[k].shape:
                    raise fail(weights, f"tensor {k} has shape {tuple(t.shape)}, expected "
                                        f"{tuple(target[k].shape)}")
                target[k].copy_(t)
    set_adapter(model, None)
    return roles


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


# -------------------------------------------------------------------- rounds summary


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


# -------------------------------------------------------------------- the whole run


def run_pipeline(cfg: dict, log=print) -> dict:
    """Every round's stages in order, each skipped or resumed as its files say; prints the
    results table and where the outputs are. Returns the last round's results."""
    from malt_fast.eval.evaluate import format_table, seeds_phrase

    first = Run(cfg, log)
    rounds = []
    for r in range(1, cfg["rounds"] + 1):
        run = first if r == 1 else first.for_round(r)
        if cfg["rounds"] > 1:
            log(f"\n=== round {r}/{cfg['rounds']} (theta {run.theta:g}) in {run.dir}")
        run.start_round()
        trees = run.expand()
        data = run.credit(trees)
        trained = run.train(data)
        results = run.evaluate(trained=bool(trained), base=run.base_results())
        summary = json.loads((data / "summary.json").read_text())
        rounds.append({"round": r, "theta": run.theta, "results": results, "summary": summary,
                       "dir": run.dir})
    last = rounds[-1]
    log("\n" + "\n".join(format_credit(r["summary"], r["round"] if cfg["rounds"] > 1 else None)
                         for r in rounds))
    log(f"\nresults ({last['results']['dataset']}, accuracy in %, mean ± std over "
        f"{seeds_phrase(last['results'])}"
        + (f", round {cfg['rounds']}" if cfg["rounds"] > 1 else "") + "):")
    log(format_table(last["results"]))
    where = [f"\nrun directory: {first.root}"]
    if cfg["rounds"] > 1:
        summary = rounds_summary(rounds)
        files = write_rounds(first.root, summary) if ranks.is_main() else {
            "report": first.root / "rounds.md", "plot": first.root / "plots" / "rounds.png"}
        log("\naccuracy per round (round 0 = untrained pipeline):")
        log(format_rounds(summary))
        where += [f"  rounds: {files['report']}", f"  rounds plot: {files['plot']}"]
    for r in rounds:
        tag = f"  round {r['round']} " if cfg["rounds"] > 1 else "  "
        d = r["dir"]
        where += [f"{tag}report: {d / 'eval' / 'report.md'}",
                  f"{tag}plot: {d / 'eval' / 'plots' / 'accuracy.png'}",
                  f"{tag}checkpoints: {d / 'train' / 'checkpoints'}",
                  f"{tag}metrics: {d / 'metrics.jsonl'}"]
    log("\n".join(where))
    return last["results"]
