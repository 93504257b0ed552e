"""Training of the three roles: SFT, then DPO from the SFT state, in one process or across ranks.

`finetune: lora` (the default): one frozen base model holds a LoRA adapter per role.
`finetune: full`: each role trains its own full copy of the base, made when the role starts and
released once it is exported, so role after role costs the base plus one training copy.

Each role's phases run in order (SFT, then DPO where enabled); the DPO reference is the role's
SFT state, whose log-probs are computed once and cached (malt_fast.train.reference), so no
second model is kept. Roles run one after another (`schedule: sequential`) or interleaved one
optimizer step at a time (`joint`); each role has its own optimizer and its own RNG stream, so
both schedules end at the same weights.

Batches keep the rows that share a prompt together, and with `packing: tree` (the default) each
distinct prompt of a batch is run once with all its distinct completions after it under an
ancestor mask (malt_fast.train.packing): same sequence log-probs as unpacked rows, fewer tokens.

Every `save_every` steps and at each phase end the trained weights, optimizer, scheduler, data
position and RNG are saved; rerunning resumes from there and ends at the same weights. A
non-finite loss stops the run, the state before the bad step saved. Per step, metrics go to
`metrics.jsonl` and TensorBoard (`OUT/tensorboard`), and a tqdm bar shows rate and ETA.

The loop is `Trainer`'s alone; its `Backend` does what differs between one process
(`LocalBackend`) and ranks under DeepSpeed (malt_fast.train.distributed.DeepSpeedBackend).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from malt_fast import phases
from malt_fast.config import TrainConfig, TrainJob, validate
from malt_fast.errors import MaltError, fail
from malt_fast.model.checkpoint import load_model, save_model
from malt_fast.model.lora import (LoRAConfig, add_adapter, adapter_parameters, load_adapter,
                                  lora_modules, save_adapter, set_adapter)
from malt_fast.train.losses import (IGNORE, completion_mask, dpo_loss, sequence_logprobs,
                                    token_logprobs)
from malt_fast.train.packing import batch_sequence_logprobs, pack_sequences
from malt_fast.train.reference import model_hash, reference_logprobs, tensors_hash


def job_config(cfg, source) -> TrainJob:
    """A `malt-fast train` config checked against its schema (malt_fast.config.TrainJob: `data`
    and `out` required); errors name `source` and the field, before anything loads."""
    job = validate(TrainJob, cfg, source)
    if job.init is not None and not Path(job.init).is_dir():
        raise fail(source, f"field 'init': no such directory {job.init}")
    return job


def load_job_model(job: TrainJob, device=None):
    """(model, tokenizer) of a checked `malt-fast train` config; `device` overrides its own."""
    from malt_fast.data import smollm2_gguf
    from malt_fast.model import load_tokenizer
    from malt_fast.model.dtypes import placement

    dtype, dev = placement(job.dtype, job.device, "config")
    path = job.model or smollm2_gguf()
    model, tok = load_model(path, dtype=dtype, device=device or dev), \
        load_tokenizer(job.tokenizer or path)
    tok.check_fits(model.config.vocab_size, path)
    return model, tok


# ---------------------------------------------------------------- data


def read_rows(path: Path, fields: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise fail(path, "no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(f"{path}:{n}", f"invalid JSON ({e.msg})") from None
            missing = [k for k in fields if k not in row]
            if missing:
                raise fail(f"{path}:{n}", f"missing field {missing[0]!r}")
            if not isinstance(row["prompt"], list):
                raise fail(f"{path}:{n}", "field 'prompt' must be a chat message list")
            rows.append(row)
    return rows


_SENTINEL = "\x00REPLY\x00"


def turn_closing(tok, prompt: list[dict]) -> str:
    """The text the chat template puts after an assistant reply's content (SmolLM2:
    "<|im_end|>\n"): what an open turn (a reply cut by the token budget) leaves out."""
    text = tok.chat_text(prompt + [{"role": "assistant", "content": _SENTINEL}],
                         add_generation_prompt=False)
    return text[text.rindex(_SENTINEL) + len(_SENTINEL):]


def encode_parts(tok, prompt: list[dict], completion: str, max_len: int,
                 closed: bool = True) -> tuple[list, list]:
    """(prompt_ids, completion_ids) with the chat template applied exactly as at rollout. A
    closed completion includes its end-of-turn tokens; an open one (`closed=False`: a reply cut
    by the token budget, which did not choose to stop) ends at its last content token. At most
    max_len tokens together, cut from the end."""
    head = tok.apply_chat_template(prompt, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                   add_generation_prompt=False)
    if full[:len(head)] == head:
        body = full[len(head):]
    else:
        # A completion starting with whitespace can merge with the template's last token (the
        # newline after "assistant") when the whole text is re-encoded. The rollout saw the
        # prompt's ids and then the reply's own tokens, so split at the text boundary instead.
        head_text = tok.chat_text(prompt, add_generation_prompt=True)
        full_text = tok.chat_text(prompt + [{"role": "assistant", "content": completion}],
                                  add_generation_prompt=False)
        if not full_text.startswith(head_text):
            raise MaltError("the chat template does not render a prompt as a prefix of prompt + "
                            "answer")
        body = tok.encode(full_text[len(head_text):])
    if not closed:
        closing = tok.encode(turn_closing(tok, prompt))
        if closing and body[-len(closing):] == closing:
            body = body[:-len(closing)]
        else:  # the closing merged with the reply's last characters: encode the content alone
            body = tok.encode(completion)
    return head[:max_len], body[:max(0, max_len - len(head))]


def joined(seq: tuple[list, list]) -> tuple[list, list]:
    """(prompt_ids, completion_ids) -> unpacked (input_ids, labels), the prompt labelled IGNORE."""
    prompt, completion = seq
    return list(prompt) + list(completion), [IGNORE] * len(prompt) + list(completion)


def encode_pair(tok, prompt: list[dict], completion: str, max_len: int) -> tuple[list, list]:
    """(input_ids, labels) of one unpacked sequence; only the completion turn is labelled."""
    return joined(encode_parts(tok, prompt, completion, max_len))


def collate(seqs: list[tuple[list, list]], pad_id: int = 0):
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for r, (i, lab) in enumerate(seqs):  # right padding: causal attention never sees it
        ids[r, :len(i)] = torch.tensor(i, dtype=torch.long)
        labels[r, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return ids, labels


def policy_logprobs(model, seqs, packing="tree", backend=None, logprob_fn=None):
    """Summed completion log-probs [S] (fp32) of (prompt_ids, completion_ids) sequences, and the
    number of token positions the forward ran (padding included).

    packing "tree": one row per distinct prompt holding its distinct completions; "none": one
    right-padded row per sequence. Equal up to rounding (tests/train/test_train_packing.py).
    """
    if packing == "tree":
        batch = pack_sequences(seqs)
        return batch_sequence_logprobs(model, batch, backend, logprob_fn), batch.input_ids.numel()
    device = model.embed_tokens.weight.device
    ids, labels = collate([joined(s) for s in seqs])
    ids, labels = ids.to(device), labels.to(device)
    logp = token_logprobs(model, ids, labels, backend=backend, logprob_fn=logprob_fn)
    return sequence_logprobs(logp, completion_mask(labels)), ids.numel()


def prompt_groups(keys: list[tuple]) -> list[list[int]]:
    """Item indices grouped by key (prompt ids), groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


@dataclass
class PhaseData:
    path: Path
    items: list  # SFT: (prompt, completion) ids; DPO: ((prompt, chosen), (prompt, rejected))
    groups: list[list[int]]


def phase_seqs(phase, items, idx) -> list:
    """The (prompt_ids, completion_ids) sequences of items `idx`: SFT rows, or DPO pairs as
    chosen, rejected, chosen, ..."""
    return [items[i] for i in idx] if phase == "sft" else [s for i in idx for s in items[i]]


def scored(phase, items, idx) -> bool:
    """Whether items `idx` have any completion token to score."""
    return any(c for _, c in phase_seqs(phase, items, idx))


class RolePolicy(nn.Module):
    """A role's forward, `policy_logprobs` with its adapter active; as a module, what a DeepSpeed
    engine wraps, so its hooks see every module call (the fused kernel reaches a ZeRO-3-sharded
    lm_head through losses.head_logprobs, which runs it as lm_head's own forward)."""

    def __init__(self, model: nn.Module, role: str, packing="tree", backend=None):
        super().__init__()
        self.model, self.role, self.packing, self.backend = model, role, packing, backend

    def forward(self, seqs):
        if self.role in getattr(self.model, "lora_configs", {}):
            set_adapter(self.model, self.role)  # one base may hold every role's adapter
        return policy_logprobs(self.model, seqs, self.packing, self.backend)


# ---------------------------------------------------------------- checkpoints and RNG


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RoleRNG:
    """A role's own random stream (LoRA dropout), swapped in around each of its steps.

    With one stream per role, a role's trajectory does not depend on how its steps interleave with
    the other roles' (joint vs sequential), and each role's checkpoint holds all it needs to resume.
    """

    def __init__(self, seed: int, role: str):
        self.seed = int(hashlib.sha256(f"{seed}-{role}".encode()).hexdigest()[:15], 16)
        g = torch.Generator().manual_seed(self.seed)
        self.state = {"torch": g.get_state(), "python": random.Random(self.seed).getstate()}

    @contextlib.contextmanager
    def active(self):
        outer = rng_state()
        set_rng_state(self.state)
        if "cuda" not in self.state and torch.cuda.is_available():
            torch.cuda.manual_seed_all(self.seed)
        try:
            yield
        finally:
            self.state = rng_state()
            set_rng_state(outer)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def lr_schedule(warmup: int, total: int):
    """The learning-rate factor at optimizer step s of `total`: linear warm-up, then linear
    decay."""
    return lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / total)


# ---------------------------------------------------------------- backends


class Checkpoint(NamedTuple):
    """A role's last checkpoint as it concerns one phase."""

    path: Path
    step: int  # optimizer steps taken in the phase
    finished: bool  # the phase is done (this checkpoint, or a later phase's, holds its result)
    reference: Path | None  # where a DPO phase's reference log-probs are kept with it, if they are


class Backend(Protocol):
    """What differs between training in one process and across ranks, grouped by the five things
    it does; made with the trainer it serves, `backend(trainer)`."""

    rank: int  # this process's rank; 0 alone
    world: int  # the number of ranks
    device: torch.device  # where the forwards run
    tags: dict  # fields every metrics record carries

    # wrapping the model and optimizer: the role's RolePolicy as its forwards run it, a fresh
    # optimizer per phase (lr * schedule(step)), a hash of the role's weights (the same on every
    # rank: the reference's cache key)
    def wrap(self, role: str) -> nn.Module: ...
    def new_optimizer(self, role: str, lr: float, schedule) -> None: ...
    def model_key(self, role: str) -> str: ...
    # stepping: one optimizer step over the `parts` micro-batch losses from the iterator
    # `losses`, each backpropagated as 1/parts of the step's; returns the learning rate used
    def step(self, role: str, losses, parts: int) -> float: ...
    # saving and loading a checkpoint; load restores the role (weights, an unfinished phase's
    # optimizer, RNG) from last_checkpoint when that is this phase's
    def last_checkpoint(self, role: str, phase: str) -> Checkpoint | None: ...
    def load_checkpoint(self, role: str, phase: str) -> None: ...
    def save_checkpoint(self, role, phase, step: int, finished: bool, reference) -> None: ...
    # gathering for export: the role at `dest` (PEFT adapter or HF model); dest where written
    def export(self, role: str, dest: Path) -> Path | None: ...
    # sharing a batch across ranks: (the items this rank trains on, those its forward runs);
    # a tensor summed over the ranks
    def share(self, phase: str, items: list, batch: list[int]) -> tuple[list, list]: ...
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...


class LocalBackend:
    """One process: the role's model as it is, a torch AdamW per phase, and torch.save
    checkpoints, OUT/state/{role}-{phase}.pt (+ .done once the phase is finished)."""

    rank, world, tags = 0, 1, {}

    def __init__(self, trainer: Trainer):
        self.trainer, self.device = trainer, trainer.device
        self.optimizers: dict = {}  # role -> (optimizer, schedule) of the phase it trains
        self.base_hash = None

    def wrap(self, role):
        t = self.trainer
        return RolePolicy(t.policy(role), role, t.cfg.packing, t.cfg.backend)

    def new_optimizer(self, role, lr, schedule):
        opt = torch.optim.AdamW(self.trainer.trained_parameters(role), lr=lr,
                                weight_decay=self.trainer.cfg.weight_decay)
        self.optimizers[role] = opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def model_key(self, role):
        """The role's own weights only (LoRA: the base and this role's adapter), so other roles
        (mid-training under the joint schedule) do not change it."""
        t = self.trainer
        if t.cfg.finetune == "full":
            return model_hash(t.policy(role))
        if self.base_hash is None:
            base = [(n, x) for n, x in sorted(t.model.state_dict().items()) if ".lora_" not in n]
            self.base_hash = tensors_hash(base).hexdigest()
        h = hashlib.sha256(self.base_hash.encode())
        h.update(repr(t.model.lora_configs[role]).encode())
        adapter = [(f"{path}.{ab}", getattr(m, ab)[role])
                   for path, m in sorted(lora_modules(t.model).items()) if role in m.lora_A
                   for ab in ("lora_A", "lora_B")]
        return tensors_hash(adapter, h).hexdigest()

    def step(self, role, losses, parts):
        opt, sched = self.optimizers[role]
        lr = opt.param_groups[0]["lr"]
        try:
            for loss in losses:
                if loss.requires_grad:  # False only if every completion was cut to empty
                    (loss / parts).backward()
            opt.step()
            sched.step()
        finally:
            opt.zero_grad(set_to_none=True)  # full fine-tuning: gradients as large as the model
        return lr

    def path(self, role, phase, suffix=".pt") -> Path:
        return self.trainer.out_dir / "state" / f"{role}-{phase}{suffix}"

    def last_checkpoint(self, role, phase):
        # the reference is not kept: the previous phase's state stays on disk to recompute it
        path = self.path(role, phase)
        if not path.exists():
            return None
        step = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"]
        return Checkpoint(path, step, self.path(role, phase, ".done").exists(), None)

    def load_checkpoint(self, role, phase):
        t, path = self.trainer, self.path(role, phase)
        blob = torch.load(path, map_location=self.device, weights_only=False)
        mode = blob["config"].get("finetune", "lora")
        tensors = blob["params"] if "params" in blob else blob["adapter"]  # "adapter": older runs
        params = t.trained_parameters(role)
        shapes = [tuple(x.shape) for x in tensors]
        if mode != t.cfg.finetune or shapes != [tuple(p.shape) for p in params]:
            raise fail(path, f"a {mode} fine-tuning state that does not fit this run's "
                             f"{t.cfg.finetune} {role} weights (mode or shapes differ); use a "
                             "new out directory")
        with torch.no_grad():
            for p, saved in zip(params, tensors):
                p.copy_(saved)
        if not self.path(role, phase, ".done").exists():
            opt, sched = self.optimizers[role]
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
        t.rngs[role].state = blob["rng"]

    def save_checkpoint(self, role, phase, step, finished, reference):
        t = self.trainer
        opt, sched = self.optimizers.pop(role, (None, None)) if finished else self.optimizers[role]
        # saved as they are, not cloned: a full model's copy would double its memory here
        blob = {"params": [p.detach() for p in t.trained_parameters(role)],
                "optimizer": opt.state_dict() if opt else None,
                "scheduler": sched.state_dict() if sched else None,
                "step": step, "rng": t.rngs[role].state,
                "config": t.cfg.model_dump(mode="json")}
        atomic_torch_save(blob, self.path(role, phase))
        if finished:
            self.path(role, phase, ".done").write_text(str(step))

    def export(self, role, dest):
        t = self.trainer
        if t.cfg.finetune == "lora":
            return save_adapter(t.model, role, dest)
        save_model(t.policy(role), dest)
        return dest

    def share(self, phase, items, batch):
        return batch, batch

    def all_reduce(self, t):
        return t


# ---------------------------------------------------------------- trainer


class Trainer:
    """Trains `cfg.roles` from the base `model` on data_dir's sft_{role}.jsonl / dpo_{role}.jsonl.

    `init_from`: a directory of trained roles ({role}/: a PEFT adapter with LoRA, an HF model with
    full fine-tuning) that a role starts from instead of fresh weights, as iterative rounds
    continue training; a role without one there starts fresh. `backend`: what trains
    (LocalBackend, or malt_fast.train.distributed.DeepSpeedBackend). `after_step(role, phase,
    step)` runs after each optimizer step, on every rank.
    """

    def __init__(self, model, tokenizer, data_dir, out_dir, cfg: TrainConfig, log=print,
                 init_from=None, after_step=None, backend=LocalBackend):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.init_from = Path(init_from) if init_from is not None else None
        self.device = model.embed_tokens.weight.device
        self.log, self.after_step = log, after_step
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.writer = None
        self.tensorboard_off = not cfg.tensorboard
        self.role_models: dict = {}  # each role's own model (full fine-tuning; LoRA per engine)
        self.backend: Backend = backend(self)
        self.main = self.backend.rank == 0
        if not self.main:  # rank 0 logs and writes the records
            self.log = lambda *a, **k: None
            self.tensorboard_off = True

    def run(self) -> dict:
        """Train every configured role; returns {role: OUT/checkpoints/{role}} (a PEFT adapter,
        or an HF-format model with full fine-tuning), on rank 0."""
        self.prepare()
        chains = {role: self.role_steps(role) for role in self.cfg.roles}
        out = {}
        try:
            if self.cfg.schedule == "sequential":
                for role in self.cfg.roles:
                    for _ in chains[role]:
                        pass
                    out[role] = self.finish_role(role)
            else:  # joint: one optimizer step of each role in turn
                pending = list(self.cfg.roles)
                while pending:
                    for role in list(pending):
                        if next(chains[role], None) is None:
                            pending.remove(role)
                            out[role] = self.finish_role(role)
        finally:
            for chain in chains.values():
                chain.close()  # closes progress bars of roles cut short by an error
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            self.release()
        return {role: path for role, path in out.items() if path is not None}

    def prepare(self) -> None:
        """Each role's RNG stream and, with LoRA, its adapter on the shared base."""
        self.rngs = {role: RoleRNG(self.cfg.seed, role) for role in self.cfg.roles}
        if self.cfg.finetune == "lora":
            self.add_adapters(self.model)
        rank = self.backend.rank
        if rank:  # every rank made the same adapters; dropout then draws each rank's own numbers
            self.rngs = {role: RoleRNG(self.cfg.seed, f"{role}/rank{rank}")
                         for role in self.cfg.roles}

    def release(self) -> None:
        set_adapter(self.model, None)
        self.role_models.clear()

    def start_dir(self, role, marker: str) -> Path | None:
        """init_from/{role} if it holds a finished export (`marker` is the file written last)."""
        d = self.init_from / role if self.init_from is not None else None
        return d if d is not None and (d / marker).is_file() else None

    def add_adapters(self, model) -> None:
        """An adapter per role on `model`: the one it already has (the caller's), the one in
        init_from, or a new one whose A matrices come from the role's own stream, so a role
        trained alone starts where it starts in a three-role run."""
        for role in self.cfg.roles:
            if role in getattr(model, "lora_configs", {}):
                continue
            start = self.start_dir(role, "adapter_config.json")
            if start is not None:
                load_adapter(model, start, role)
                continue
            with self.rngs[role].active():
                add_adapter(model, role, LoRAConfig(**self.cfg.lora.model_dump()))

    def start_model(self, role):
        """Full fine-tuning: a trainable model of the role's own, loaded from init_from or
        copied from the base."""
        start = self.start_dir(role, "config.json")
        if start is None:
            return copy.deepcopy(self.model).requires_grad_(True)
        model = load_model(start, dtype=self.model.embed_tokens.weight.dtype, device=self.device)
        return model.requires_grad_(True)

    def policy(self, role):
        """The role's own model (full fine-tuning, made on first use; or a backend's per-role
        copy), else the shared base with the role's adapter active."""
        if role in self.role_models:
            return self.role_models[role]
        if self.cfg.finetune == "lora":
            set_adapter(self.model, role)
            return self.model
        self.role_models[role] = self.start_model(role)
        return self.role_models[role]

    def trained_parameters(self, role) -> list:
        if self.cfg.finetune == "lora":
            return adapter_parameters(self.role_models.get(role, self.model), role)
        return list(self.policy(role).parameters())

    def finish_role(self, role) -> Path | None:
        """Export a finished role to OUT/checkpoints/{role}. Its own model is released after it:
        its weights are on disk, and the next role's copy needs the memory."""
        dest = self.backend.export(role, self.out_dir / "checkpoints" / role)
        self.role_models.pop(role, None)
        return dest

    def role_steps(self, role):
        """Yields once per optimizer step of the role, over its phases, from its checkpoints."""
        for phase in self.cfg.phases(role):
            saved = self.backend.last_checkpoint(role, phase)
            if saved is not None and saved.finished:
                self.backend.load_checkpoint(role, phase)
            else:
                yield from self.phase_steps(role, phase, saved)

    def phase_data(self, role, phase) -> PhaseData:
        max_len = self.cfg.max_len
        if phase == "sft":
            path = self.data_dir / f"sft_{role}.jsonl"
            rows = read_rows(path, ("prompt", "completion"))
            items = [encode_parts(self.tok, r["prompt"], r["completion"], max_len,
                                  closed=not r.get("cut", False)) for r in rows]
            kept = [s for s in items if s[1]]
            if len(kept) < len(items):
                self.log(f"{path}: {len(items) - len(kept)} rows dropped (prompt alone fills "
                         f"max_len={max_len})")
                if not kept:
                    raise fail(path, f"every prompt fills max_len={max_len}; nothing to train on")
            items, keys = kept, [tuple(p) for p, _ in kept]
        else:
            path = self.data_dir / f"dpo_{role}.jsonl"
            rows = read_rows(path, ("prompt", "chosen", "rejected"))
            items = []
            for r in rows:
                items.append(tuple(encode_parts(self.tok, r["prompt"], r[side], max_len,
                                                closed=not r.get(f"{side}_cut", False))
                                   for side in ("chosen", "rejected")))
            keys = [tuple(c[0]) for c, _ in items]
        return PhaseData(path, items, prompt_groups(keys))

    def batch_order(self, groups, epochs, role, phase) -> list[list[int]]:
        """Shuffled batches for every epoch, a pure function of seed, role, phase and data.

        Groups (rows sharing a prompt) stay together, so a batch holds whole groups, or a group
        cut at the batch boundary, and packing has prompts to share. Both packing modes use this
        order, so they see the same batches.
        """
        rng = random.Random(f"{self.cfg.seed}-{role}-{phase}")
        out = []
        for _ in range(epochs):
            order = [list(g) for g in groups]
            rng.shuffle(order)
            for g in order:
                rng.shuffle(g)
            flat = [i for g in order for i in g]
            size = self.cfg.batch_size
            out += [flat[i:i + size] for i in range(0, len(flat), size)]
        return out

    def first_epoch(self, data: PhaseData, batches: list[list[int]]) -> list[list[int]]:
        """The micro-batches of the phase's first epoch: each epoch holds every item once."""
        return batches[:math.ceil(len(data.items) / self.cfg.batch_size)]

    def reference(self, role, data: PhaseData, batches, kept: Path | None = None) -> torch.Tensor:
        """[pairs, 2] (chosen, rejected) log-probs under the role's SFT state, cached: the policy's
        own forward (same packing, kernels and rank shares) over the first epoch's micro-batches,
        so the first DPO step compares the policy with itself bit for bit. `kept`: the copy a
        backend keeps with a resumed phase whose SFT weights are gone."""
        if kept is not None:
            if not kept.is_file():
                raise fail(kept, "missing; cannot resume DPO without the SFT reference log-probs")
            return torch.load(kept, map_location="cpu", weights_only=True)
        policy = self.backend.wrap(role)

        def batch_logprobs(idx):
            mine, run = self.backend.share("dpo", data.items, idx)
            seq, _ = policy(phase_seqs("dpo", data.items, run))
            return (mine, seq) if run is mine else ([], seq[:0])

        # what besides the weights decides a forward's rounding: part of the cache key
        layout = (f"packing={self.cfg.packing}|backend={self.cfg.backend}|"
                  f"device={self.backend.device.type}")
        policy.eval()  # the reference has no dropout; each training step sets train mode again
        with phases.phase("reference") as p:
            ref = reference_logprobs(batch_logprobs, data.items, self.first_epoch(data, batches),
                                     data.path, self.backend.model_key(role), layout,
                                     cache_dir=self.out_dir / "refcache",
                                     all_reduce=self.backend.all_reduce, write=self.main)
            p.count(sum(len(q) + len(c) for pair in data.items for q, c in pair), "forward")
        return ref

    def phase_steps(self, role: str, phase: str, saved: Checkpoint | None = None):
        """Trains one phase of the role, from `saved` (its unfinished checkpoint) if given,
        yielding after each optimizer step."""
        cfg = self.cfg
        epochs = cfg.sft_epochs if phase == "sft" else cfg.dpo_epochs
        data = self.phase_data(role, phase)
        if not data.items or epochs == 0:
            why = f"{data.path.name} is empty" if not data.items else f"{phase}_epochs is 0"
            self.log(f"{role} {phase}: {why}, phase skipped")
            self.save(role, phase, 0, finished=True)
            return
        batches = self.batch_order(data.groups, epochs, role, phase)
        total = math.ceil(len(batches) / cfg.grad_accum)
        lr = cfg.sft_lr if phase == "sft" else cfg.dpo_lr
        self.backend.new_optimizer(role, lr, lr_schedule(cfg.warmup_steps, total))
        policy = self.backend.wrap(role)
        # computed before a DPO checkpoint is loaded: from the SFT state, unless kept with it
        kept = saved.reference if saved is not None else None
        ref = self.reference(role, data, batches, kept) if phase == "dpo" else None
        step = 0  # optimizer steps taken
        if saved is not None:
            self.backend.load_checkpoint(role, phase)
            step = saved.step
            self.log(f"{role} {phase}: resuming at step {step}/{total}")
        from tqdm import tqdm

        position = cfg.roles.index(role) if cfg.schedule == "joint" else 0
        bar = tqdm(total=total, initial=step, desc=f"{role} {phase}", unit="step",
                   position=position, leave=True, dynamic_ncols=True, disable=not self.main)
        t_phase = time.perf_counter()
        try:
            while step < total:
                # one phase per optimizer step, closed before the yield: under the joint
                # schedule the roles' steps interleave
                with phases.phase(phase, self.model) as p:
                    policy.train()
                    t0 = time.perf_counter()
                    chunk = batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
                    seen, rng_before = [], self.rngs[role].state
                    try:
                        with self.rngs[role].active():
                            losses = self.micro_losses(policy, phase, data.items, chunk, ref,
                                                       seen)
                            lr_used = self.backend.step(role, losses, len(chunk))
                    except FloatingPointError as e:
                        # keep the work up to the bad step: its state (weights, optimizer, RNG as
                        # before the step) is the last good checkpoint, and a rerun resumes there
                        self.rngs[role].state = rng_before
                        self.save(role, phase, step, ref)
                        raise self.non_finite(role, phase, f"non-finite loss ({e.args[0]}) at "
                                                           f"step {step + 1}/{total}") from None
                    step += 1
                    self.finish_step(bar, self.backend.device, [m for m, _, _ in seen], t0,
                                     t_phase, role=role, phase=phase, step=step, steps=total,
                                     lr=lr_used, tokens=sum(n for _, n, _ in seen),
                                     model_tokens=sum(n for _, _, n in seen), **self.backend.tags)
                    if step % cfg.save_every == 0 and step < total:
                        self.save(role, phase, step, ref)
                    if self.after_step is not None:
                        self.after_step(role, phase, step)
                    p.count(sum(n for _, _, n in seen),
                            "train_full" if cfg.finetune == "full" else "train")
                yield step
        finally:
            bar.close()
        policy.eval()
        self.save(role, phase, step, ref, finished=True)
        if self.writer is not None:
            self.writer.flush()

    def micro_losses(self, policy, phase, items, chunk, ref, seen: list):
        """The losses of a step's micro-batches; each one's (metrics, tokens, positions run) goes
        to `seen`. A non-finite loss ends it on every rank (the forwards after it are
        collective)."""
        for batch in chunk:
            loss, *counts = self.loss(policy, phase, items, batch, ref)
            summed = self.summed({"loss": loss.item()})["loss"]  # non-finite if any rank's is
            if not math.isfinite(summed):
                raise FloatingPointError(summed)
            seen.append(counts)
            yield loss

    def loss(self, policy, phase, items, batch, ref):
        """(loss, metrics, unpacked tokens, token positions run) of micro-batch `batch`.

        Each rank scores its share of the batch (backend.share) and weights its loss by that
        share times the number of ranks, so the ranks' mean gradient is the gradient of the whole
        batch's loss: SFT counts tokens against all the batch's completion tokens, DPO pairs
        against all its pairs. The metrics are the whole batch's.
        """
        mine, run = self.backend.share(phase, items, batch)
        seqs = phase_seqs(phase, items, batch)
        seq, ran = policy(phase_seqs(phase, items, run))
        borrowed = run is not mine
        if borrowed:  # nothing of its own to score: a forward all the same, at zero weight
            keep_graph = seq.sum() * 0.0
            seq = torch.zeros(len(phase_seqs(phase, items, mine)), device=seq.device)
        if phase == "sft":
            n = sum(len(c) for _, c in seqs)
            part = -seq.sum() / n  # token-weighted mean NLL, as losses.sft_loss
            weight, mets = self.backend.world, {"loss": part.item()}
        else:
            frac = len(mine) / len(batch)
            pairs = seq.view(-1, 2)
            r = ref[mine].to(pairs)
            part, mets = dpo_loss(pairs[:, 0], pairs[:, 1], r[:, 0], r[:, 1], self.cfg.beta,
                                  self.cfg.dpo_loss) if mine else (pairs.sum(), self.no_pairs())
            weight, mets = frac * self.backend.world, {k: v * frac for k, v in mets.items()}
        loss = part * weight
        if borrowed:
            loss = loss + keep_graph
        mets = self.summed({**mets, "_ran": ran})
        ran = int(mets.pop("_ran"))
        if phase == "sft":
            mets["tokens"] = n
        return loss, mets, sum(len(p) + len(c) for p, c in seqs), ran

    def no_pairs(self) -> dict:
        z = torch.zeros(1)
        return {k: 0.0 for k in dpo_loss(z, z, z, z, self.cfg.beta, self.cfg.dpo_loss)[1]}

    def summed(self, values: dict) -> dict:
        """Each value summed over the ranks (alone: as it is)."""
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
        return dict(zip(values, self.backend.all_reduce(t).tolist()))

    def save(self, role, phase, step, reference=None, finished=False):
        """The phase's state after `step` optimizer steps. Non-finite weights are never saved,
        so every checkpoint on disk is a good one to resume from."""
        held = [getattr(p, "ds_tensor", p) for p in self.trained_parameters(role)]  # ZeRO-3: shard
        if self.summed({"bad": not all(bool(torch.isfinite(t).all()) for t in held)})["bad"]:
            raise self.non_finite(role, phase, f"the weights went non-finite by step {step}")
        self.backend.save_checkpoint(role, phase, step, finished, reference)

    def non_finite(self, role, phase, what: str) -> MaltError:
        """The one-line error that ends a run whose loss or weights went non-finite, naming the
        phase's last good checkpoint and its step."""
        saved = self.backend.last_checkpoint(role, phase)
        if saved is None:
            return MaltError(f"{role} {phase}: {what}; this phase has no checkpoint yet")
        return MaltError(f"{role} {phase}: {what}; the last good checkpoint is {saved.path} "
                         f"(step {saved.step})")

    def finish_step(self, bar, device, metrics: list[dict], t0: float, t_phase: float,
                    **fields) -> dict:
        """One optimizer step's record (micro-batch metrics averaged, throughput, memory) to
        metrics.jsonl / TensorBoard (rank 0) and the progress bar."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        rec = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        rec.update(fields, step_s=dt, tokens_per_s=fields["tokens"] / max(dt, 1e-9),
                   peak_mem_mib=peak_memory_mib(device),
                   elapsed_s=time.perf_counter() - t_phase)
        if self.main:
            self.write_metrics(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                        refresh=False)
        bar.update(1)
        return rec

    def write_metrics(self, rec: dict) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        writer = self.tensorboard()
        if writer is not None:
            prefix = f"{rec['role']}/{rec['phase']}"
            for k, v in rec.items():
                if k not in ("role", "phase", "step", "steps") and isinstance(v, (int, float)):
                    writer.add_scalar(f"{prefix}/{k}", v, rec["step"])

    def tensorboard(self):
        if self.tensorboard_off:
            return None
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # optional: metrics.jsonl has everything
                self.log(f"TensorBoard logging off ({e}); pip install tensorboard to enable it")
                self.tensorboard_off = True
                return None
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        return self.writer
