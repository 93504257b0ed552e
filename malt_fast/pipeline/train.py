"""The train stage: RUN_DIR/data/ -> RUN_DIR/train/checkpoints/{role}/ (and STaR's agent), in
this process or, with a `deepspeed:` entry, as `deepspeed.nproc` processes under torchrun
(`malt-fast train` on a generated job, one DeepSpeed engine per role). Once per training seed
(`train.seeds`); a seed whose roles are all exported is skipped, a partial one resumes from its
checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from malt_fast import ranks
from malt_fast.config import STAR, train_config
from malt_fast.errors import MaltError
from malt_fast.phases import span
from malt_fast.pipeline.rounds import previous_checkpoints
from malt_fast.pipeline.run_dir import Run


def train(run: Run, data: Path) -> list[str]:
    """Train every training seed's roles, then make the last seed's the ones the run's engines
    decode with. Returns those roles."""
    run.guard("train")
    for t in training_seeds(run):
        done = trained(run, t=t)
        ranks.barrier()  # every rank has decided before any rank trains
        if done:
            run.log(f"train: {checkpoints(run, t)} complete, skipped")
        else:
            with span("train"):
                _train_seed(run, data, t)
        if run.star and ranks.is_main():
            train_star(run, data, t)
        ranks.barrier()  # the roles are exported before any rank loads them
    return run.models.use_roles(checkpoints(run, t))


def _train_seed(run: Run, data: Path, t) -> None:
    from malt_fast.train.trainer import Trainer

    cfg = train_cfg(run, t)
    t0 = time.perf_counter()
    if run.cfg["deepspeed"] is not None:
        train_deepspeed(run, data, cfg, train_dir(run, t))
    elif ranks.is_main():  # across ranks without DeepSpeed: rank 0 trains alone
        run.models.roles = {}  # full: the trainer loads each role's start itself
        Trainer(run.models.model, run.models.tok, data, train_dir(run, t), cfg, log=run.log,
                init_from=previous_checkpoints(run)).run()
    run.record("train", time.perf_counter() - t0, training_seed=cfg.seed)


def training_seeds(run: Run) -> list:
    """`train.seeds`, or [None]: one training run with train.seed (else the round's seed)."""
    return list(run.cfg["train"]["seeds"] or [None])


def train_cfg(run: Run, t=None):
    cfg = train_config(run.cfg, seed=run.seed)
    return cfg if t is None else cfg.model_copy(update={"seed": t})


def train_dir(run: Run, t=None) -> Path:
    """Where training seed t trains (RUN_DIR/train, or RUN_DIR/train/seed-T with seeds)."""
    return run.dir / "train" if t is None else run.dir / "train" / f"seed-{t}"


def checkpoints(run: Run, t=None) -> Path:
    return train_dir(run, t) / "checkpoints"


def trained(run: Run, roles=None, t=None) -> bool:
    """Every role of `roles` (default train.roles) exported by training seed t (an export
    writes its config file last)."""
    marker = "adapter_config.json" if run.finetune == "lora" else "config.json"
    roles = train_config(run.cfg).roles if roles is None else roles
    return all((checkpoints(run, t) / r / marker).is_file() for r in roles)


def load_trained(run: Run) -> bool:
    """This round's trained roles (the last training seed's), if its training stage finished
    for every training seed (a standalone evaluate); roles left out of train.roles decode with
    the base."""
    seeds = training_seeds(run)
    if not all(trained(run, t=t) for t in seeds):
        return False
    run.models.use_roles(checkpoints(run, seeds[-1]))
    return True


def train_star(run: Run, data: Path, t=None) -> None:
    """The STaR baseline's single agent, trained in this process like a fourth role (SFT on
    sft_star.jsonl, the run's finetune mode), unless it is exported already."""
    if trained(run, (STAR,), t):
        return
    from malt_fast.train.trainer import Trainer

    cfg = train_cfg(run, t).model_copy(update={"roles": (STAR,)})
    t0 = time.perf_counter()
    with span("train"):
        Trainer(run.models.model, run.models.tok, data, train_dir(run, t), cfg,
                log=run.log).run()
    run.record("train_star", time.perf_counter() - t0, training_seed=cfg.seed)


def train_deepspeed(run: Run, data: Path, cfg, out: Path) -> None:
    """`deepspeed.nproc` processes under torchrun, each running `malt-fast train` on a job
    written here (one DeepSpeed engine per role, docs/distributed.md). This process drops its
    models first, as the ranks load their own. A killed stage resumes from DeepSpeed's
    checkpoints when rerun."""
    from malt_fast.malt.trees import atomic_write_text
    from malt_fast.train.distributed import free_port, parse_spec

    spec = parse_spec(run.cfg["deepspeed"], "config")
    model_path = run.models.path
    job = {"model": str(model_path), "tokenizer": str(run.cfg["tokenizer"] or model_path),
           "dtype": run.cfg["dtype"], "data": str(data), "out": str(out),
           "train": cfg.model_dump(mode="json"), "deepspeed": str(spec.config)}
    if previous_checkpoints(run) is not None:
        job["init"] = str(previous_checkpoints(run))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "deepspeed-job.yaml"
    if ranks.is_main():
        atomic_write_text(path, json.dumps(job, indent=1) + "\n")  # JSON is YAML
    ranks.barrier()
    run.models.release()
    if ranks.world() > 1:  # already under torchrun: these ranks train, nothing is launched
        _train_here(run, path, spec)
        return
    env = dict(os.environ)
    if run.cfg["threads"]:
        env["OMP_NUM_THREADS"] = str(run.cfg["threads"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(spec.nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "malt_fast.cli", "train", str(path)]
    run.log(f"train: torchrun --nproc_per_node {spec.nproc} -m malt_fast.cli train {path}")
    rc = subprocess.run(cmd, env=env, preexec_fn=_die_with_parent).returncode
    if rc != 0:
        raise MaltError(f"{path}: the DeepSpeed train stage failed (torchrun exit status "
                        f"{rc}, its error is above); rerunning resumes it")


def _train_here(run: Run, job: Path, spec) -> None:
    """The train stage of a run already under torchrun (`torchrun ... malt_fast.cli run`):
    every rank runs `malt-fast train` on the job in this process, in the ranks' group
    (deepspeed.nproc is not used: the ranks are the launcher's)."""
    from malt_fast.config import read_yaml
    from malt_fast.train.distributed import train_from_config

    if spec.nproc != ranks.world():
        run.log(f"train: {ranks.world()} ranks (the launcher's), not deepspeed.nproc "
                f"{spec.nproc}")
    run.log(f"train: {ranks.world()} ranks in this run's group, malt-fast train {job}")
    train_from_config(read_yaml(job), str(job))


def _die_with_parent() -> None:
    """In the torchrun child: be sent SIGTERM when `malt-fast run` dies (also by SIGKILL), so an
    orphaned training job never races the rerun that resumes it."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
