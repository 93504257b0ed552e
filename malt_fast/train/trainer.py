"""Single-process training of the three roles: SFT, then DPO from the SFT state, LoRA per role.

One frozen base model holds a LoRA adapter per role. Each role's phases run in order
(SFT, then DPO where enabled); the DPO reference is the role's SFT state, whose log-probs are
computed once and cached next to the DPO set (malt_fast.train.reference), so no second model is
kept. Every `save_every` steps and at each phase end the adapter, optimizer, scheduler, data
position and RNG are saved; rerunning resumes from there and ends at the same weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from malt_fast.errors import MaltError, fail
from malt_fast.model.lora import (LoRAConfig, add_adapter, adapter_parameters, save_adapter,
                                  set_adapter)
from malt_fast.train.losses import IGNORE, completion_mask, dpo_loss, sft_loss, token_logprobs
from malt_fast.train.reference import reference_logprobs

ROLES = ("generator", "verifier", "refiner")


@dataclass
class TrainConfig:
    roles: tuple[str, ...] = ROLES
    generator_dpo: bool = False         # the paper trains the generator with SFT only by default
    sft_epochs: int = 1
    dpo_epochs: int = 1
    sft_lr: float = 2e-4
    dpo_lr: float = 5e-5
    beta: float = 0.2                   # DPO β, as in the paper
    dpo_loss: str = "sigmoid"           # sigmoid | ipo | hinge
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 1024                 # longer sequences are cut from the completion's end
    warmup_steps: int = 0
    weight_decay: float = 0.0
    save_every: int = 50
    seed: int = 0
    lora: dict = field(default_factory=lambda: {"rank": 16, "alpha": 32.0, "dropout": 0.0})
    backend: str | None = None          # linear_logprobs backend; None picks by device

    def phases(self, role: str) -> list[str]:
        return ["sft", "dpo"] if role != "generator" or self.generator_dpo else ["sft"]


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


def encode_pair(tok, prompt: list[dict], completion: str, max_len: int) -> tuple[list, list]:
    """(input_ids, labels) with the chat template applied exactly as at rollout; only the
    completion turn (with its end-of-turn tokens) is labelled."""
    head = tok.apply_chat_template(prompt, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                   add_generation_prompt=False)
    if full[:len(head)] != head:
        raise MaltError("the chat template does not render a prompt as a prefix of prompt + answer")
    full = full[:max_len]
    labels = [IGNORE] * len(head) + full[len(head):]
    return full, labels[:len(full)]


def collate(seqs: list[tuple[list, list]], pad_id: int):
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for r, (i, lab) in enumerate(seqs):  # right padding: causal attention never sees it
        ids[r, :len(i)] = torch.tensor(i)
        labels[r, :len(lab)] = torch.tensor(lab)
    return ids, labels


# ---------------------------------------------------------------- checkpoints


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
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


# ---------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, model, tokenizer, data_dir, out_dir, cfg: TrainConfig, log=print):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.device = model.embed_tokens.weight.device
        self.log = log
        self.metrics_path = self.out_dir / "metrics.jsonl"

    # one phase = one role's SFT or DPO pass; its state lives in out_dir/state/{role}-{phase}.pt
    def state_path(self, role, phase) -> Path:
        return self.out_dir / "state" / f"{role}-{phase}.pt"

    def done_path(self, role, phase) -> Path:
        return self.out_dir / "state" / f"{role}-{phase}.done"

    def run(self) -> dict:
        """Train every configured role; returns {role: adapter directory}."""
        torch.manual_seed(self.cfg.seed)
        for role in self.cfg.roles:
            if role not in getattr(self.model, "lora_configs", {}):
                add_adapter(self.model, role, LoRAConfig(**self.cfg.lora))
        out = {}
        for role in self.cfg.roles:
            for phase in self.cfg.phases(role):
                if self.done_path(role, phase).exists():
                    self.load_adapter_state(role, phase)
                    continue
                self.train_phase(role, phase)
            out[role] = save_adapter(self.model, role, self.out_dir / "checkpoints" / role)
        set_adapter(self.model, None)
        return out

    def load_adapter_state(self, role, phase):
        blob = torch.load(self.state_path(role, phase), map_location=self.device, weights_only=False)
        with torch.no_grad():
            for p, saved in zip(adapter_parameters(self.model, role), blob["adapter"]):
                p.copy_(saved)

    def sequences(self, role, phase):
        """Tokenized SFT sequences, or (chosen, rejected) sequence pairs for DPO."""
        max_len = self.cfg.max_len
        if phase == "sft":
            path = self.data_dir / f"sft_{role}.jsonl"
            rows = read_rows(path, ("prompt", "completion"))
            seqs = [encode_pair(self.tok, r["prompt"], r["completion"], max_len) for r in rows]
        else:
            path = self.data_dir / f"dpo_{role}.jsonl"
            rows = read_rows(path, ("prompt", "chosen", "rejected"))
            seqs = [(encode_pair(self.tok, r["prompt"], r["chosen"], max_len),
                     encode_pair(self.tok, r["prompt"], r["rejected"], max_len)) for r in rows]
        return path, seqs

    def train_phase(self, role: str, phase: str) -> None:
        cfg = self.cfg
        path, seqs = self.sequences(role, phase)
        if not seqs:
            self.log(f"{role} {phase}: {path.name} is empty, phase skipped")
            self.save(role, phase, None, None, 0, finished=True)
            return
        set_adapter(self.model, role)
        ref = None
        if phase == "dpo":  # reference = this role's SFT state, computed once and cached
            flat = [s for pair in seqs for s in pair]
            ref = reference_logprobs(self.model, flat, path, cache_dir=self.out_dir / "refcache",
                                     backend=cfg.backend).view(-1, 2)
        params = adapter_parameters(self.model, role)
        lr = cfg.sft_lr if phase == "sft" else cfg.dpo_lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        epochs = cfg.sft_epochs if phase == "sft" else cfg.dpo_epochs
        per_epoch = math.ceil(len(seqs) / cfg.batch_size)
        total = math.ceil(per_epoch * epochs / cfg.grad_accum)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1 - s / total))
        step = 0  # optimizer steps taken
        if self.state_path(role, phase).exists():
            blob = torch.load(self.state_path(role, phase), map_location=self.device,
                              weights_only=False)
            self.load_adapter_state(role, phase)
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
            step = blob["step"]
            set_rng_state(blob["rng"])
            self.log(f"{role} {phase}: resuming at step {step}/{total}")
        self.model.train()
        batches = self.batch_order(len(seqs), epochs, role, phase)
        micro = cfg.grad_accum
        t0, tokens = time.perf_counter(), 0
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"{role} {phase}", unit="step", leave=False)
        while step < total:
            opt.zero_grad(set_to_none=True)
            metrics = []
            for m in range(micro):
                b = step * micro + m
                if b >= len(batches):
                    break
                idx = batches[b]
                loss, mets, ntok = self.loss(phase, [seqs[i] for i in idx], ref, idx)
                if not torch.isfinite(loss):
                    raise MaltError(f"{role} {phase}: non-finite loss at step {step}; the last "
                                    f"good checkpoint is {self.state_path(role, phase)}")
                (loss / micro).backward()
                metrics.append(mets)
                tokens += ntok
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            rec = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
            rec.update(role=role, phase=phase, step=step, lr=sched.get_last_lr()[0],
                       tokens_per_s=tokens / max(1e-9, time.perf_counter() - t0))
            self.write_metrics(rec)
            if step % cfg.save_every == 0 and step < total:
                self.save(role, phase, opt, sched, step)
        bar.close()
        self.model.eval()
        self.save(role, phase, opt, sched, step, finished=True)

    def batch_order(self, n, epochs, role, phase) -> list[list[int]]:
        """Deterministic shuffled batches for every epoch, fixed by seed, role and phase."""
        rng = random.Random(f"{self.cfg.seed}-{role}-{phase}")
        out = []
        for _ in range(epochs):
            order = list(range(n))
            rng.shuffle(order)
            out += [order[i:i + self.cfg.batch_size] for i in range(0, n, self.cfg.batch_size)]
        return out

    def loss(self, phase, batch, ref, idx):
        pad = self.tok.pad_token_id
        if phase == "sft":
            ids, labels = collate(batch, pad)
            ids, labels = ids.to(self.device), labels.to(self.device)
            logp = token_logprobs(self.model, ids, labels, backend=self.cfg.backend)
            loss, mets = sft_loss(logp, completion_mask(labels))
            return loss, mets, int(ids.numel())
        ids, labels = collate([s for pair in batch for s in pair], pad)
        ids, labels = ids.to(self.device), labels.to(self.device)
        logp = token_logprobs(self.model, ids, labels, backend=self.cfg.backend)
        seq = torch.where(completion_mask(labels), logp, 0.0).sum(-1).view(-1, 2)
        r = ref[idx].to(seq)
        loss, mets = dpo_loss(seq[:, 0], seq[:, 1], r[:, 0], r[:, 1], self.cfg.beta,
                              self.cfg.dpo_loss)
        return loss, mets, int(ids.numel())

    def save(self, role, phase, opt, sched, step, finished=False):
        blob = {"adapter": [p.detach().clone() for p in adapter_parameters(self.model, role)],
                "optimizer": opt.state_dict() if opt else None,
                "scheduler": sched.state_dict() if sched else None,
                "step": step, "rng": rng_state(), "config": asdict(self.cfg)}
        atomic_torch_save(blob, self.state_path(role, phase))
        if finished:
            self.done_path(role, phase).write_text(str(step))

    def write_metrics(self, rec: dict) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
