"""Multi-process training of the three roles with DeepSpeed: one engine per role (ZeRO-3).

    torchrun --nproc_per_node 2 -m malt_fast.cli train run.yaml      # run.yaml: deepspeed: <json>

Each role gets its own module (a copy of the base model: full fine-tuning trains all of it; LoRA
trains only the role's adapter over a frozen base copy) wrapped by its own `deepspeed.initialize`
engine, so ZeRO shards each role's weights, gradients and optimizer state over the ranks. The
training itself is the single-process trainer's: the same encoded sequences, batch order, losses,
learning-rate schedule, per-role RNG streams, sequential/joint schedules and metrics (it subclasses
`Trainer`); only the global micro-batch is split over the ranks, with the losses weighted so that
DeepSpeed's gradient averaging gives exactly the single-process gradient (`micro_loss`).

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`), one directory per role,
`OUT/deepspeed/{role}/{phase}-{step:06d}/`, plus a sidecar `malt.json` (phase, step, world size)
and each rank's RNG state; `OUT/deepspeed/{role}/latest` names the newest complete one, and a rerun
with the same number of ranks resumes there.
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
import time
from pathlib import Path

import torch
from torch import nn

from malt_fast.config import deepspeed_spec
from malt_fast.errors import MaltError, fail
from malt_fast.model.lora import adapter_parameters, lora_modules, save_adapter, set_adapter
from malt_fast.train.losses import dpo_loss
from malt_fast.train.reference import (cache_path, check_batches, compute_reference,
                                       load_reference, reference_key, save_reference)
from malt_fast.train.trainer import (RoleRNG, TrainConfig, Trainer, atomic_torch_save, job_config,
                                     load_job_model, policy_logprobs)

# activation_checkpointing keys that only mean something with model parallelism (not used here)
_MODEL_PARALLEL_ONLY = ("partition_activations", "cpu_checkpointing",
                        "contiguous_memory_optimization")


def parse_spec(entry, source):
    """A config's `deepspeed:` entry: a JSON path, or {config: path, nproc: N}. `nproc` is the
    number of processes `malt-fast run` launches for its train stage; `malt-fast train` runs
    with whatever its launcher started."""
    return deepspeed_spec(entry, source)


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


class RolePolicy(nn.Module):
    """What a role engine wraps. Its forward is the single-process trainer's `policy_logprobs`
    (summed completion log-probs of (prompt_ids, completion_ids) sequences, tree-packed or not),
    so the engine's hooks see every module call; the fused kernel reaches the ZeRO-3-sharded
    lm_head through losses.head_logprobs, which runs it as lm_head's own forward."""

    def __init__(self, model: nn.Module, packing="tree", backend=None):
        super().__init__()
        self.model, self.packing, self.backend = model, packing, backend

    def forward(self, seqs):
        return policy_logprobs(self.model, seqs, self.packing, self.backend)


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
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = getattr(p, "ds_tensor", p).detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, h.hexdigest())
    return hashlib.sha256("|".join(digests).encode()).hexdigest()


def gathered(params):
    """Full tensors of (possibly ZeRO-3-partitioned) parameters inside the block, on every rank."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)


def phase_seqs(phase, items, idx) -> list:
    """The (prompt_ids, completion_ids) sequences of items `idx`: SFT rows, or DPO pairs as
    chosen, rejected, chosen, ..."""
    return [items[i] for i in idx] if phase == "sft" else [s for i in idx for s in items[i]]


def scored(phase, items, idx) -> bool:
    """Whether items `idx` have any completion token to score."""
    return any(c for _, c in phase_seqs(phase, items, idx))


# ---------------------------------------------------------------- trainer


class DeepSpeedTrainer(Trainer):
    """`Trainer` with one DeepSpeed engine per role. Every rank runs the same code on the same
    data and takes its slice of every global micro-batch. Reuses the trainer's data encoding,
    batch order, per-role RNG streams, schedules (sequential / joint) and metrics writer."""

    def __init__(self, model, tokenizer, data_dir, out_dir, cfg: TrainConfig, ds_config: dict,
                 ds_source, log=print, after_step=None, init_from=None):
        super().__init__(model, tokenizer, data_dir, out_dir, cfg, log=log, init_from=init_from)
        from deepspeed.accelerator import get_accelerator

        self.after_step, self.ds_source = after_step, ds_source
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        cuda = get_accelerator().device_name() == "cuda"
        self.ds_config = resolve_ds_config(ds_config, ds_source, cfg, self.world, cuda)
        self.engines: dict = {}
        if self.rank != 0:
            self.log = lambda *a, **k: None
            self.tensorboard_off = True

    # -------------------------------------------------------- engines

    def ckpt_dir(self, role) -> Path:
        return self.out_dir / "deepspeed" / role

    def prepare(self) -> None:
        """One engine per role. LoRA adapters are created on the shared base first, each from its
        role's own seeded stream as in the single-process trainer, so every rank (and a
        single-process run) starts from the same adapters; each role then gets its own copy of
        the model (with LoRA the last role takes the base itself), which its engine
        partitions."""
        import deepspeed

        base = self.model
        self.rngs = {role: RoleRNG(self.cfg.seed, role) for role in self.cfg.roles}
        if self.cfg.finetune == "lora":
            self.add_adapters(base)
        roles = list(self.cfg.roles)
        for i, role in enumerate(roles):
            if self.cfg.finetune == "full":
                model = self.start_model(role)
            else:
                model = base if i == len(roles) - 1 else copy.deepcopy(base)
                keep_only_adapter(model, role)
            if "activation_checkpointing" in self.ds_config:
                checkpoint_blocks(model)
            module = RolePolicy(model, self.cfg.packing, self.cfg.backend)
            params = [p for p in module.parameters() if p.requires_grad]
            client = None
            if "optimizer" not in self.ds_config:
                client = torch.optim.AdamW(params, lr=self.cfg.sft_lr,
                                           weight_decay=self.cfg.weight_decay)
            try:
                engine, *_ = deepspeed.initialize(model=module, model_parameters=params,
                                                  optimizer=client,
                                                  config=copy.deepcopy(self.ds_config))
            except ValueError as e:  # DeepSpeed's config validation (pydantic) errors
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise fail(self.ds_source, f"rejected by DeepSpeed: {first}") from None
            self.engines[role] = engine
        self.model = None  # LoRA: the base lives on, sharded, in the last role's engine
        if self.rank:  # rank 0 continues the single-process streams (dropout); others get their own
            self.rngs = {role: RoleRNG(self.cfg.seed, f"{role}/rank{self.rank}") for role in roles}

    def start_phase(self, engine, phase, total) -> None:
        """Fresh optimizer moments, the phase's learning rate and a new schedule (warmup, then
        linear decay, as in the single-process trainer): DPO starts from the SFT weights with a
        new optimizer, like a new AdamW there."""
        opt = engine.basic_optimizer
        opt.state.clear()  # moments are created lazily at the next step
        lr = self.cfg.sft_lr if phase == "sft" else self.cfg.dpo_lr
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = lr
        warmup = self.cfg.warmup_steps
        engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / total))

    # -------------------------------------------------------- run (Trainer.run's schedule)

    def release(self) -> None:
        for engine in self.engines.values():
            engine.destroy()

    def finish_role(self, role) -> Path | None:
        return self.export_role(role)

    def role_steps(self, role):
        """Yields once per optimizer step of the role, over its phases, from the last checkpoint."""
        engine, phases, cfg = self.engines[role], self.cfg.phases(role), self.cfg
        resume = self.resume_point(role)
        first = phases.index(resume["phase"]) if resume else 0
        for phase in phases[first:]:
            data = self.phase_data(role, phase)
            epochs = cfg.sft_epochs if phase == "sft" else cfg.dpo_epochs
            batches = self.batch_order(data.groups, epochs, role, phase)
            total = math.ceil(len(batches) / cfg.grad_accum)
            # the schedule must exist before a load, which restores its position
            self.start_phase(engine, phase, max(total, 1))
            step = 0
            if resume is not None and phase == resume["phase"]:
                step = self.load_role_checkpoint(engine, role, resume)
                if resume["finished"]:
                    continue
            if not data.items:
                self.log(f"{role} {phase}: {data.path.name} is empty, phase skipped")
                self.save_role_checkpoint(engine, role, phase, 0, finished=True)
                continue
            yield from self.engine_steps(engine, role, phase, data, batches, total, step)

    def engine_steps(self, engine, role, phase, data, batches, total, step):
        cfg = self.cfg
        ref = self.dpo_reference(engine, role, data, batches, fresh=step == 0) \
            if phase == "dpo" else None
        if step:
            self.log(f"{role} {phase}: resuming at step {step}/{total}")
        from tqdm import tqdm

        position = cfg.roles.index(role) if cfg.schedule == "joint" else 0
        bar = tqdm(total=total, initial=step, desc=f"{role} {phase}", unit="step",
                   position=position, leave=False, dynamic_ncols=True, disable=self.rank != 0)
        t_phase = time.perf_counter()
        try:
            while step < total:
                engine.train()
                t0 = time.perf_counter()
                metrics, tokens, model_tokens = [], 0, 0
                chunk = batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
                lr_used = engine.basic_optimizer.param_groups[0]["lr"]
                with self.rngs[role].active():
                    for n, idx in enumerate(chunk):
                        # explicit boundary: a phase's last optimizer step may be short
                        engine.set_gradient_accumulation_boundary(n == len(chunk) - 1)
                        loss, mets, ntok = self.micro_loss(engine, phase, data.items, idx, ref)
                        if not math.isfinite(mets["loss"]):
                            last = self.latest_dir(role)
                            where = "this role has no checkpoint yet" if last is None else \
                                f"the last good checkpoint is {last}"
                            raise MaltError(f"{role} {phase}: non-finite loss ({mets['loss']}) "
                                            f"at step {step + 1}/{total}; {where}")
                        # DeepSpeed divides by grad_accum; the trainer averages over the
                        # micro-batches the step has, fewer in a phase's short last step
                        engine.backward(loss * (cfg.grad_accum / len(chunk)))
                        engine.step()
                        model_tokens += int(mets.pop("_ran"))
                        metrics.append(mets)
                        tokens += ntok
                step += 1
                self.finish_step(bar, engine.device, metrics, t0, t_phase,
                                 write=self.rank == 0, role=role, phase=phase, step=step,
                                 steps=total, lr=lr_used, tokens=tokens,
                                 model_tokens=model_tokens, world_size=self.world)
                if step % cfg.save_every == 0 and step < total:
                    self.save_role_checkpoint(engine, role, phase, step)
                if self.after_step is not None:
                    self.after_step(role, phase, step)
                yield step
        finally:
            bar.close()
        engine.eval()
        self.save_role_checkpoint(engine, role, phase, step, finished=True)
        if self.writer is not None:
            self.writer.flush()

    def rank_share(self, phase, items, batch) -> tuple[list[int], list[int]]:
        """(mine, run): this rank's contiguous slice of a global micro-batch (shared prompts stay
        together), and the items its forward runs: `mine`, or, when `mine` has nothing to score
        (a short last batch), one borrowed item of the batch, because ZeRO-3 gathers weights
        collectively and every rank must run a forward."""
        k = math.ceil(len(batch) / self.world)
        mine = batch[self.rank * k:(self.rank + 1) * k]
        if not scored(phase, items, batch):
            raise MaltError(f"{phase}: every completion of a micro-batch is empty (prompts fill "
                            f"max_len={self.cfg.max_len}); raise max_len or drop those rows")
        run = mine if scored(phase, items, mine) else \
            [next(i for i in batch if scored(phase, items, [i]))]
        return mine, run

    def micro_loss(self, engine, phase, items, batch, ref):
        """This rank's part of one global micro-batch: (loss to backward, global metrics, tokens).

        A rank's loss is its share of the whole batch's loss times the world size, so DeepSpeed's
        mean of the ranks' gradients is the gradient of the single-process loss: SFT counts
        tokens against all the batch's completion tokens, DPO pairs against all its pairs. A rank
        left with nothing to score still runs a forward and backward, of a borrowed sequence at
        zero weight (rank_share).
        """
        mine, run = self.rank_share(phase, items, batch)
        seq, ran = engine(phase_seqs(phase, items, run))
        keep_graph = seq.sum() * 0.0
        own = seq if run is mine else torch.zeros(len(phase_seqs(phase, items, mine)),
                                                  device=seq.device)
        if phase == "sft":
            n = sum(len(c) for _, c in phase_seqs(phase, items, batch))
            part = -own.sum() / n
            loss = part * self.world + keep_graph
            mets = self.all_reduce({"loss": part.item(), "_ran": ran})
            mets["tokens"] = n
        else:
            frac = len(mine) / len(batch)
            own = own.view(-1, 2)
            r = ref[mine].to(own)
            part, local = dpo_loss(own[:, 0], own[:, 1], r[:, 0], r[:, 1], self.cfg.beta,
                                   self.cfg.dpo_loss) if mine else (own.sum(), self.no_pairs())
            loss = part * (frac * self.world) + keep_graph
            mets = self.all_reduce({**{k: v * frac for k, v in local.items()}, "_ran": ran})
        return loss, mets, sum(len(p) + len(c) for p, c in phase_seqs(phase, items, batch))

    def no_pairs(self) -> dict:
        z = torch.zeros(1)
        return {k: 0.0 for k in dpo_loss(z, z, z, z, self.cfg.beta, self.cfg.dpo_loss)[1]}

    def all_reduce(self, values: dict) -> dict:
        keys = list(values)
        device = next(iter(self.engines.values())).device
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def dpo_reference(self, engine, role, data, batches, fresh: bool) -> torch.Tensor:
        """[pairs, 2] log-probs under the role's SFT state, computed (or read from the shared
        reference cache) when DPO starts and kept in the role's checkpoint directory: a run
        resumed mid-DPO no longer has the SFT weights to recompute them from.

        As in the single-process trainer, the reference is the policy's own forward over the
        first epoch's micro-batches, each rank scoring the share it trains on (rank_share), so
        the first DPO step compares the policy with itself bit for bit; the ranks' shares are
        then summed into the whole table (each pair is scored by exactly one rank)."""
        keep = self.ckpt_dir(role) / "dpo-reference.pt"
        if not fresh:
            if not keep.is_file():
                raise fail(keep, "missing; cannot resume DPO without the SFT reference log-probs")
            return torch.load(keep, map_location="cpu", weights_only=True)
        first = self.first_epoch(data, batches)
        check_batches(first, len(data.items))
        key = reference_key(data.path, "zero-" + sharded_model_key(engine.module), data.items,
                            first, f"{self.layout(torch.device(engine.device))}|world={self.world}")
        path = cache_path(data.path, key, self.out_dir / "refcache")
        ref = load_reference(path, key, len(data.items))
        # the forwards are collective under ZeRO-3: every rank computes, or none
        cached = self.all_reduce({"missing": float(ref is None)})["missing"] == 0
        if not cached:
            def batch_logprobs(idx):
                mine, run = self.rank_share("dpo", data.items, idx)
                seq, _ = engine(phase_seqs("dpo", data.items, run))
                return (mine, seq) if run is mine else ([], seq[:0])

            engine.eval()  # the reference has no dropout
            ref = compute_reference(batch_logprobs, first, len(data.items)).to(engine.device)
            torch.distributed.all_reduce(ref)
            ref = ref.cpu()
            if self.rank == 0:
                save_reference(path, key, ref)
        if self.rank == 0:
            atomic_torch_save(ref, keep)
        torch.distributed.barrier()
        return ref

    # -------------------------------------------------------- checkpoints

    def latest_dir(self, role) -> Path | None:
        pointer = self.ckpt_dir(role) / "latest"
        return self.ckpt_dir(role) / pointer.read_text().strip() if pointer.is_file() else None

    def resume_point(self, role) -> dict | None:
        tag_dir = self.latest_dir(role)
        if tag_dir is None:
            return None
        meta_path = tag_dir / "malt.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise fail(meta_path, f"unreadable checkpoint metadata ({e})") from None
        if meta.get("world_size") != self.world:
            raise fail(tag_dir, f"written by {meta.get('world_size')} ranks, this run has "
                                f"{self.world}; rerun with {meta.get('world_size')} ranks or use "
                                "a new out directory")
        mode = self.cfg.finetune
        if meta.get("phase") not in self.cfg.phases(role) or meta.get("finetune") != mode:
            raise fail(tag_dir, f"a {meta.get('finetune')} {meta.get('phase')} checkpoint, but "
                                f"{role} now trains {mode} {self.cfg.phases(role)}; use "
                                "a new out directory")
        meta["tag"] = tag_dir.name
        return meta

    def load_role_checkpoint(self, engine, role, meta) -> int:
        tag_dir = self.ckpt_dir(role) / meta["tag"]
        path, _ = engine.load_checkpoint(str(self.ckpt_dir(role)), tag=meta["tag"],
                                         load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise fail(tag_dir, "DeepSpeed could not load this checkpoint")
        self.rngs[role].state = torch.load(tag_dir / f"rng-rank{self.rank}.pt",
                                           weights_only=True)
        return meta["step"]

    def save_role_checkpoint(self, engine, role, phase, step, finished=False) -> None:
        """Every rank writes its shards; `latest` moves only after all have finished, so a kill
        at any moment leaves it naming a complete checkpoint. Older ones are then deleted (each
        holds the full optimizer state)."""
        root = self.ckpt_dir(role)
        tag = f"{phase}-{step:06d}"
        (root / tag).mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.rngs[role].state, root / tag / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            meta = {"role": role, "phase": phase, "step": step, "finished": finished,
                    "world_size": self.world, "finetune": self.cfg.finetune,
                    "config": self.cfg.model_dump(mode="json")}
            (root / tag / "malt.json").write_text(json.dumps(meta, indent=1))
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            tmp = root / ".latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, root / "latest")  # the same file DeepSpeed's own tools read
            for old in root.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def export_role(self, role) -> Path | None:
        """OUT/checkpoints/{role}: a PEFT adapter (LoRA) or an HF-format model (full), as the
        single-process trainer writes them, gathered one parameter at a time onto rank 0."""
        dest = self.out_dir / "checkpoints" / role
        model = self.engines[role].module.model
        if self.cfg.finetune == "lora":
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
        return dest if self.rank == 0 else None


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
        trainer = DeepSpeedTrainer(model, tok, job.data, job.out, job.train, raw, spec.config,
                                   after_step=after_step, init_from=job.init)
        return trainer.run()
    finally:
        if created:
            torch.distributed.destroy_process_group()
