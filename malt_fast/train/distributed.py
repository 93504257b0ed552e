"""Training across processes with DeepSpeed: the `Trainer` with one engine per role (ZeRO-3).

    torchrun --nproc_per_node 2 -m malt_fast.cli train run.yaml      # run.yaml: deepspeed: <json>

`DeepSpeedBackend` gives each role its own module (a copy of the base model: full fine-tuning
trains all of it; LoRA only the role's adapter over a frozen base copy) and its own engine, so
ZeRO shards each role's weights, gradients and optimizer state over the ranks. Each rank takes its
slice of every global micro-batch (`share`); the rest is the trainer's, as in one process.
Checkpoints are DeepSpeed's own, `OUT/deepspeed/{role}/{phase}-{step:06d}/` with a sidecar
`malt.json` and each rank's RNG state; `OUT/deepspeed/{role}/latest` names the newest complete one,
where a rerun with the same number of ranks resumes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import socket
from pathlib import Path

import torch
from torch import nn

from malt_fast.config import deepspeed_spec
from malt_fast.errors import MaltError, fail
from malt_fast.model.lora import adapter_parameters, lora_modules, save_adapter, set_adapter
from malt_fast.train.reference import tensors_hash
from malt_fast.train.trainer import (Checkpoint, RolePolicy, TrainConfig, Trainer,
                                     atomic_torch_save, job_config, load_job_model, scored)

# activation_checkpointing keys that only mean something with model parallelism (not used here)
_MODEL_PARALLEL_ONLY = ("partition_activations", "cpu_checkpointing",
                        "contiguous_memory_optimization")


# a config's `deepspeed:` entry: a JSON path, or {config: path, nproc: N} (the processes
# `malt-fast run` launches for its train stage; `malt-fast train` runs with its launcher's)
parse_spec = deepspeed_spec


# ---------------------------------------------------------------- DeepSpeed JSON configs


def read_ds_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise fail(path, "no such DeepSpeed config file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise fail(path, f"invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise fail(path, "a DeepSpeed config must be a JSON object")
    return d


def _section(d: dict, key: str, source) -> dict:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise fail(source, f"{key!r} must be a JSON object")
    return value


def _leftover_auto(node, path=""):
    if node == "auto":
        return path
    if isinstance(node, dict):
        items = node.items()
    else:
        items = enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        found = _leftover_auto(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def resolve_ds_config(raw: dict, source, cfg: TrainConfig, world: int, cuda: bool) -> dict:
    """The JSON with every "auto" filled from the train: section; conflicts name the file.

    Batch sizes follow the single-process meaning of the train: section: `batch_size` sequences
    (DPO: pairs) per micro-step across all ranks, `grad_accum` micro-steps per optimizer step, so
    a run gives the same optimizer steps on any number of ranks.
    """
    d = copy.deepcopy(raw)
    if cfg.batch_size < world:
        raise fail(source, f"train.batch_size {cfg.batch_size} is smaller than the {world} ranks; "
                           "every rank needs a sequence in each micro-batch")
    micro = math.ceil(cfg.batch_size / world)
    wanted = {"train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": cfg.grad_accum,
              "train_batch_size": micro * cfg.grad_accum * world}
    for key, value in wanted.items():
        got = d.get(key, "auto")
        if got == "auto":
            d[key] = value
        elif got != value:
            raise fail(source, f"{key} is {got!r} but the train: section implies {value} "
                               f"(batch_size {cfg.batch_size} over {world} ranks, grad_accum "
                               f"{cfg.grad_accum}); set it to \"auto\"")
    zero = _section(d, "zero_optimization", source)
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise fail(source, f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "scheduler" in d:
        raise fail(source, "remove 'scheduler': the learning-rate schedule comes from the train: "
                           "section (warmup_steps, then linear decay), as in single-process runs")
    if d.get("gradient_clipping", "auto") == "auto":
        d["gradient_clipping"] = 0.0  # the single-process trainer does not clip either
    for prec in ("bf16", "fp16"):
        sec = _section(d, prec, source)
        if sec.get("enabled") == "auto":
            sec["enabled"] = bool(prec == "bf16" and cuda and torch.cuda.is_bf16_supported())
    if _section(d, "bf16", source).get("enabled") and _section(d, "fp16", source).get("enabled"):
        raise fail(source, "bf16 and fp16 are both enabled; pick one")
    opt = _section(d, "optimizer", source)
    if opt:
        params = opt.setdefault("params", {})
        if params.get("lr", "auto") == "auto":
            params["lr"] = cfg.sft_lr  # reset to the phase's rate before each phase
        if params.get("weight_decay", "auto") == "auto":
            params["weight_decay"] = cfg.weight_decay
    off = _section(zero, "offload_optimizer", source)
    forced = d.get("zero_force_ds_cpu_optimizer", True)
    if off.get("device", "none") != "none" and not opt and forced:
        raise fail(source, "offload_optimizer needs an 'optimizer' section (DeepSpeed's CPU Adam) "
                           "or \"zero_force_ds_cpu_optimizer\": false (torch AdamW on the CPU)")
    ckpt = _section(d, "activation_checkpointing", source)
    for key in _MODEL_PARALLEL_ONLY:
        if ckpt.get(key):
            raise fail(source, f"activation_checkpointing.{key} needs model parallelism, which "
                               "malt-fast does not use; set it to false")
    left = _leftover_auto(d)
    if left:
        raise fail(source, f"{left} is \"auto\", which malt-fast cannot fill; give a value")
    return d


# ---------------------------------------------------------------- process group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> bool:
    """Join (or, without a launcher, create a one-rank) process group: NCCL on CUDA, else gloo.

    Returns True when this call created the group, so the caller knows to destroy it: a process
    that exits with a live group can abort at interpreter shutdown.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise MaltError(f"the config's deepspeed: entry needs DeepSpeed ({e}); "
                        "pip install deepspeed") from None
    if torch.distributed.is_initialized():
        return False
    if "RANK" not in os.environ:  # plain `malt-fast train`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = get_accelerator().device_name() == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return True


# ---------------------------------------------------------------- role modules


def keep_only_adapter(model, role: str) -> None:
    """Drop every adapter but `role`'s from a model holding one per role."""
    for m in lora_modules(model).values():
        for name in [n for n in m.lora_A if n != role]:
            del m.lora_A[name], m.lora_B[name], m.dropout[name]
            m.scaling.pop(name, None)
    model.lora_configs = {role: model.lora_configs[role]}
    set_adapter(model, role)


def checkpoint_blocks(model) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations.

    Non-reentrant checkpointing, because with LoRA the block inputs (frozen embeddings) need no
    gradient and a reentrant checkpoint would then drop the adapters' gradients. The recompute
    calls the block's submodules again, so ZeRO-3's hooks gather their weights for it.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        run = type(block).forward.__get__(block)

        def forward(x, cos, sin, cache=None, mask=None, _run=run):
            if cache is not None or not torch.is_grad_enabled():
                return _run(x, cos, sin, cache, mask)
            return checkpoint(_run, x, cos, sin, None, mask, use_reentrant=False)

        block.forward = forward  # an instance attribute shadows Block.forward


def sharded_model_key(module: nn.Module) -> str:
    """A hash of the weights as the ranks hold them (ZeRO-3: each rank its shard), the same on
    every rank: the reference log-prob cache key for a model no single rank holds whole."""
    mine = tensors_hash((n, getattr(p, "ds_tensor", p)) for n, p in module.named_parameters())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, mine.hexdigest())
    return hashlib.sha256("|".join(digests).encode()).hexdigest()


def gathered(params):
    """Full tensors of (possibly ZeRO-3-partitioned) parameters inside the block, on every rank."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)


# ---------------------------------------------------------------- backend


class DeepSpeedBackend:
    """One DeepSpeed engine per role, built when the role starts and destroyed once it is
    exported. Every rank runs the trainer's code on the same data; see Backend for the methods."""

    def __init__(self, trainer: Trainer, ds_config: dict, source):
        from deepspeed.accelerator import get_accelerator

        self.trainer, self.source = trainer, source
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(get_accelerator().device_name(local))  # the engines' own
        self.config = resolve_ds_config(ds_config, source, trainer.cfg, self.world,
                                        self.device.type == "cuda")
        self.tags = {"world_size": self.world}
        self.engines: dict = {}
        self.built: set = set()

    # wrapping the model and optimizer
    def wrap(self, role):
        """The role's engine, built on first use. With LoRA, every rank made the same adapters on
        the shared base (trainer.prepare); the role's module is a copy of the base with its
        adapter alone (the last one built takes the base itself), partitioned by its engine."""
        if role in self.engines:
            return self.engines[role]
        import deepspeed

        t = self.trainer
        model = t.policy(role)
        if t.cfg.finetune == "lora":
            if len(self.built) < len(t.cfg.roles) - 1:
                model = copy.deepcopy(model)
            keep_only_adapter(model, role)
            t.role_models[role] = model
        self.built.add(role)
        if "activation_checkpointing" in self.config:
            checkpoint_blocks(model)
        module = RolePolicy(model, role, t.cfg.packing, t.cfg.backend)
        params = [p for p in module.parameters() if p.requires_grad]
        client = None
        if "optimizer" not in self.config:
            client = torch.optim.AdamW(params, lr=t.cfg.sft_lr, weight_decay=t.cfg.weight_decay)
        try:
            self.engines[role], *_ = deepspeed.initialize(
                model=module, model_parameters=params, optimizer=client,
                config=copy.deepcopy(self.config))
        except ValueError as e:  # DeepSpeed's config validation (pydantic) errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise fail(self.source, f"rejected by DeepSpeed: {first}") from None
        return self.engines[role]

    def new_optimizer(self, role, lr, schedule):
        """Fresh moments, the phase's learning rate and schedule on the role's one engine: what
        a new AdamW is in one process."""
        engine = self.wrap(role)
        opt = engine.basic_optimizer
        opt.state.clear()  # moments are created lazily at the next step
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = lr
        engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def model_key(self, role):
        return "zero-" + sharded_model_key(self.wrap(role).module)

    # stepping
    def step(self, role, losses, parts):
        engine = self.engines[role]
        lr = engine.basic_optimizer.param_groups[0]["lr"]
        for n in range(parts):
            # explicit boundary: a phase's last optimizer step may be short
            engine.set_gradient_accumulation_boundary(n == parts - 1)
            # DeepSpeed divides by grad_accum; the step averages over the micro-batches it has
            engine.backward(next(losses) * (self.trainer.cfg.grad_accum / parts))
            engine.step()
        return lr

    # checkpoints
    def ckpt_dir(self, role) -> Path:
        return self.trainer.out_dir / "deepspeed" / role

    def latest(self, role) -> dict | None:
        """The metadata of the role's newest complete checkpoint, checked against this run."""
        pointer = self.ckpt_dir(role) / "latest"
        if not pointer.is_file():
            return None
        tag_dir = self.ckpt_dir(role) / pointer.read_text().strip()
        meta_path = tag_dir / "malt.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise fail(meta_path, f"unreadable checkpoint metadata ({e})") from None
        if meta.get("world_size") != self.world:
            raise fail(tag_dir, f"written by {meta.get('world_size')} ranks, this run has "
                                f"{self.world}; rerun with {meta.get('world_size')} ranks or use "
                                "a new out directory")
        cfg = self.trainer.cfg
        if meta.get("phase") not in cfg.phases(role) or meta.get("finetune") != cfg.finetune:
            raise fail(tag_dir, f"a {meta.get('finetune')} {meta.get('phase')} checkpoint, but "
                                f"{role} now trains {cfg.finetune} {cfg.phases(role)}; use "
                                "a new out directory")
        return {**meta, "dir": tag_dir}

    def last_checkpoint(self, role, phase):
        # only the newest checkpoint is kept, so a resumed DPO phase reads its reference from
        # the role's dpo-reference.pt: the SFT weights to recompute it from are gone
        meta = self.latest(role)
        phases = self.trainer.cfg.phases(role)
        if meta is None or phases.index(meta["phase"]) < phases.index(phase):
            return None
        later = meta["phase"] != phase
        reference = self.ckpt_dir(role) / "dpo-reference.pt" if phase == "dpo" else None
        return Checkpoint(meta["dir"], meta["step"], later or meta["finished"], reference)

    def load_checkpoint(self, role, phase):
        meta = self.latest(role)
        if meta["phase"] != phase:
            return  # a later phase's checkpoint holds this one's result
        path, _ = self.wrap(role).load_checkpoint(str(self.ckpt_dir(role)), tag=meta["dir"].name,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise fail(meta["dir"], "DeepSpeed could not load this checkpoint")
        self.trainer.rngs[role].state = torch.load(meta["dir"] / f"rng-rank{self.rank}.pt",
                                                   weights_only=True)

    def save_checkpoint(self, role, phase, step, finished, reference):
        """Every rank writes its shards; `latest` moves only after all have finished, so a kill
        at any moment leaves it naming a complete checkpoint. Older ones are then deleted (each
        holds the full optimizer state)."""
        t, root = self.trainer, self.ckpt_dir(role)
        tag = f"{phase}-{step:06d}"
        if (root / "latest").is_file() and (root / "latest").read_text().strip() == tag:
            return  # this very state (a stop before the next step): never rewrite `latest`'s
        (root / tag).mkdir(parents=True, exist_ok=True)
        atomic_torch_save(t.rngs[role].state, root / tag / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            meta = {"role": role, "phase": phase, "step": step, "finished": finished,
                    "world_size": self.world, "finetune": t.cfg.finetune,
                    "config": t.cfg.model_dump(mode="json")}
            (root / tag / "malt.json").write_text(json.dumps(meta, indent=1))
            if reference is not None:
                atomic_torch_save(reference, root / "dpo-reference.pt")
        self.wrap(role).save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            tmp = root / ".latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, root / "latest")  # the same file DeepSpeed's own tools read
            for old in root.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    # gathering for export
    def export(self, role, dest):
        """A PEFT adapter (LoRA) or an HF-format model (full), as one process writes them,
        gathered one parameter at a time onto rank 0. The engine goes with it: the next role's
        needs the memory."""
        engine = self.wrap(role)
        model = engine.module.model
        if self.trainer.cfg.finetune == "lora":
            with gathered(adapter_parameters(model, role)):
                if self.rank == 0:
                    save_adapter(model, role, dest)
        else:
            from malt_fast.model.checkpoint import build_model, save_model

            tensors = {}
            for name, p in model.named_parameters():
                with gathered([p]):
                    if self.rank == 0:
                        tensors[name] = p.detach().to("cpu", copy=True)
            if self.rank == 0:
                dtype = next(iter(tensors.values())).dtype
                save_model(build_model(model.config, tensors, dest, dtype, "cpu"), dest, dtype)
        torch.distributed.barrier()
        engine.destroy()
        del self.engines[role]
        return dest if self.rank == 0 else None

    # sharing a batch across ranks
    def share(self, phase, items, batch):
        """(mine, run): this rank's contiguous slice of a global micro-batch (shared prompts stay
        together), and the items its forward runs: `mine`, or, when `mine` has nothing to score
        (a short last batch), one borrowed item of the batch, because ZeRO-3 gathers weights
        collectively and every rank must run a forward."""
        k = math.ceil(len(batch) / self.world)
        mine = batch[self.rank * k:(self.rank + 1) * k]
        if not scored(phase, items, batch):
            raise MaltError(f"{phase}: every completion of a micro-batch is empty (prompts fill "
                            f"max_len={self.trainer.cfg.max_len}); raise max_len or drop those "
                            "rows")
        run = mine if scored(phase, items, mine) else \
            [next(i for i in batch if scored(phase, items, [i]))]
        return mine, run

    def all_reduce(self, t):
        out = t.to(self.device)
        torch.distributed.all_reduce(out)
        return out.to(t.device)


# ---------------------------------------------------------------- entry point


def train_from_config(cfg: dict, source, after_step=None) -> dict:
    """`malt-fast train CONFIG` when CONFIG has a `deepspeed:` entry. Run under torchrun or the
    deepspeed launcher (or alone: a one-rank group). Returns {role: checkpoint dir} on rank 0.
    `after_step(role, phase, step)` runs on every rank after each optimizer step."""
    job = job_config(cfg, source)
    spec = parse_spec(job.deepspeed, source)
    raw = read_ds_config(spec.config)
    created = init_distributed()
    try:
        # on the CPU: the engine moves each rank's shards to its device
        model, tok = load_job_model(job, device="cpu")
        trainer = Trainer(model, tok, job.data, job.out, job.train, init_from=job.init,
                          after_step=after_step,
                          backend=lambda t: DeepSpeedBackend(t, raw, spec.config))
        return trainer.run()
    finally:
        if created:
            torch.distributed.destroy_process_group()
