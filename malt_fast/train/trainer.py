"""Single-process training of the three roles: SFT, then DPO from the SFT state.

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

import torch

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


# ---------------------------------------------------------------- trainer


class Trainer:
    """Trains `cfg.roles` from the base `model` on data_dir's sft_{role}.jsonl / dpo_{role}.jsonl.

    `init_from`: a directory of trained roles ({role}/: a PEFT adapter with LoRA, an HF model with
    full fine-tuning) that a role starts from instead of fresh weights, as iterative rounds
    continue training; a role without one there starts fresh.
    """

    def __init__(self, model, tokenizer, data_dir, out_dir, cfg: TrainConfig, log=print,
                 init_from=None):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.init_from = Path(init_from) if init_from is not None else None
        self.device = model.embed_tokens.weight.device
        self.log = log
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.writer = None
        self.tensorboard_off = not cfg.tensorboard
        self._base_hash = None
        self.role_models: dict = {}  # full fine-tuning: each training role's own model

    # one phase = one role's SFT or DPO pass; its state lives in out_dir/state/{role}-{phase}.pt
    def state_path(self, role, phase) -> Path:
        return self.out_dir / "state" / f"{role}-{phase}.pt"

    def done_path(self, role, phase) -> Path:
        return self.out_dir / "state" / f"{role}-{phase}.done"

    def run(self) -> dict:
        """Train every configured role; returns {role: OUT/checkpoints/{role}} (a PEFT adapter,
        or an HF-format model with full fine-tuning)."""
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
        """What the role's forward runs: the base with the role's adapter active (LoRA), or the
        role's own model (full), made on first use: roles that have not started hold no copy."""
        if self.cfg.finetune == "lora":
            set_adapter(self.model, role)  # the joint schedule switches roles between steps
            return self.model
        if role not in self.role_models:
            self.role_models[role] = self.start_model(role)
        return self.role_models[role]

    def trained_parameters(self, role) -> list:
        if self.cfg.finetune == "lora":
            return adapter_parameters(self.model, role)
        return list(self.policy(role).parameters())

    def finish_role(self, role) -> Path:
        """Export a finished role to OUT/checkpoints/{role}. A full copy is released after it:
        its weights are on disk, and the next role's copy needs the memory."""
        dest = self.out_dir / "checkpoints" / role
        if self.cfg.finetune == "lora":
            return save_adapter(self.model, role, dest)
        save_model(self.policy(role), dest)
        del self.role_models[role]
        return dest

    def role_steps(self, role):
        """Yields once per optimizer step of the role, over all its phases."""
        for phase in self.cfg.phases(role):
            if self.done_path(role, phase).exists():
                blob = self.load_state(role, phase)
                self.rngs[role].state = blob["rng"]
                continue
            yield from self.phase_steps(role, phase)

    def load_state(self, role, phase) -> dict:
        path = self.state_path(role, phase)
        blob = torch.load(path, map_location=self.device, weights_only=False)
        mode = blob["config"].get("finetune", "lora")
        tensors = blob["params"] if "params" in blob else blob["adapter"]  # "adapter": older runs
        params = self.trained_parameters(role)
        shapes = [tuple(t.shape) for t in tensors]
        if mode != self.cfg.finetune or shapes != [tuple(p.shape) for p in params]:
            raise fail(path, f"a {mode} fine-tuning state that does not fit this run's "
                             f"{self.cfg.finetune} {role} weights (mode or shapes differ); use a "
                             "new out directory")
        with torch.no_grad():
            for p, saved in zip(params, tensors):
                p.copy_(saved)
        return blob

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

    def role_model_key(self, role) -> str:
        """Cache key of the reference: the role's own weights only (LoRA: the base and this role's
        adapter), so other roles (mid-training under the joint schedule) do not change it."""
        if self.cfg.finetune == "full":
            return model_hash(self.policy(role))
        if self._base_hash is None:
            base = [(n, t) for n, t in sorted(self.model.state_dict().items()) if ".lora_" not in n]
            self._base_hash = tensors_hash(base).hexdigest()
        h = hashlib.sha256(self._base_hash.encode())
        h.update(repr(self.model.lora_configs[role]).encode())
        adapter = [(f"{path}.{ab}", getattr(m, ab)[role])
                   for path, m in sorted(lora_modules(self.model).items()) if role in m.lora_A
                   for ab in ("lora_A", "lora_B")]
        return tensors_hash(adapter, h).hexdigest()

    def first_epoch(self, data: PhaseData, batches: list[list[int]]) -> list[list[int]]:
        """The micro-batches of the phase's first epoch: each epoch holds every item once."""
        return batches[:math.ceil(len(data.items) / self.cfg.batch_size)]

    def layout(self, device) -> str:
        """What besides the weights decides a forward's rounding: part of the reference key."""
        return f"packing={self.cfg.packing}|backend={self.cfg.backend}|device={device.type}"

    def reference(self, role, data: PhaseData, batches) -> torch.Tensor:
        """[pairs, 2] (chosen, rejected) log-probs under the role's SFT state, cached: the policy's
        own forward (`policy_logprobs`, same packing and kernels) over the first epoch's
        micro-batches, so the first DPO step compares the policy with itself bit for bit."""
        model = self.policy(role)

        def batch_logprobs(idx):
            seqs = [s for i in idx for s in data.items[i]]
            return idx, policy_logprobs(model, seqs, self.cfg.packing, self.cfg.backend)[0]

        was_training = model.training
        model.eval()  # the reference has no dropout
        try:
            return reference_logprobs(batch_logprobs, data.items, self.first_epoch(data, batches),
                                      data.path, self.role_model_key(role),
                                      self.layout(self.device),
                                      cache_dir=self.out_dir / "refcache")
        finally:
            model.train(was_training)

    def phase_steps(self, role: str, phase: str):
        cfg = self.cfg
        epochs = cfg.sft_epochs if phase == "sft" else cfg.dpo_epochs
        data = self.phase_data(role, phase)
        if not data.items or epochs == 0:
            why = f"{data.path.name} is empty" if not data.items else f"{phase}_epochs is 0"
            self.log(f"{role} {phase}: {why}, phase skipped")
            self.save(role, phase, None, None, 0, finished=True)
            return
        batches = self.batch_order(data.groups, epochs, role, phase)
        ref = self.reference(role, data, batches) if phase == "dpo" else None
        params = self.trained_parameters(role)
        lr = cfg.sft_lr if phase == "sft" else cfg.dpo_lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        micro = cfg.grad_accum
        total = math.ceil(len(batches) / micro)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1 - s / total))
        step = 0  # optimizer steps taken
        if self.state_path(role, phase).exists():
            blob = self.load_state(role, phase)
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
            step = blob["step"]
            self.rngs[role].state = blob["rng"]
            self.log(f"{role} {phase}: resuming at step {step}/{total}")
        from tqdm import tqdm

        position = cfg.roles.index(role) if cfg.schedule == "joint" else 0
        bar = tqdm(total=total, initial=step, desc=f"{role} {phase}", unit="step",
                   position=position, leave=True, dynamic_ncols=True)
        t_phase = time.perf_counter()
        try:
            while step < total:
                model = self.policy(role).train()
                t0 = time.perf_counter()
                metrics, tokens, model_tokens = [], 0, 0
                chunk = batches[step * micro:(step + 1) * micro]
                rng_before, bad = self.rngs[role].state, None
                with self.rngs[role].active():
                    opt.zero_grad(set_to_none=True)
                    for idx in chunk:
                        loss, mets, ntok, nrun = self.loss(model, phase,
                                                           [data.items[i] for i in idx], ref, idx)
                        if not torch.isfinite(loss):
                            bad = loss.item()
                            break
                        if loss.requires_grad:  # False only if every completion was cut to empty
                            (loss / len(chunk)).backward()
                        metrics.append(mets)
                        tokens += ntok
                        model_tokens += nrun
                    if bad is None:
                        lr_used = opt.param_groups[0]["lr"]
                        opt.step()
                        sched.step()
                if bad is not None:
                    # keep the work up to the bad step: its state (weights, optimizer, RNG as
                    # before the step) is the last good checkpoint, and a rerun resumes there
                    self.rngs[role].state = rng_before
                    opt.zero_grad(set_to_none=True)
                    self.save(role, phase, opt, sched, step)
                    raise self.non_finite(role, phase, f"non-finite loss ({bad}) at step "
                                                       f"{step + 1}/{total}")
                step += 1
                self.finish_step(bar, self.device, metrics, t0, t_phase, role=role,
                                 phase=phase, step=step, steps=total, lr=lr_used,
                                 tokens=tokens, model_tokens=model_tokens)
                if step % cfg.save_every == 0 and step < total:
                    self.save(role, phase, opt, sched, step)
                yield step
        finally:
            bar.close()
        opt.zero_grad(set_to_none=True)  # full fine-tuning: gradients as large as the model
        self.policy(role).eval()
        self.save(role, phase, opt, sched, step, finished=True)
        if self.writer is not None:
            self.writer.flush()

    def loss(self, model, phase, items, ref, idx):
        """(loss, metrics, unpacked tokens, token positions run) of one micro-batch."""
        seqs = items if phase == "sft" else [s for pair in items for s in pair]
        seq, ran = policy_logprobs(model, seqs, self.cfg.packing, self.cfg.backend)
        tokens = sum(len(p) + len(c) for p, c in seqs)
        if phase == "sft":
            # token-weighted mean NLL over completion tokens, as losses.sft_loss
            n = sum(len(c) for _, c in seqs)
            loss = -seq.sum() / n
            return loss, {"loss": loss.item(), "tokens": n}, tokens, ran
        seq = seq.view(-1, 2)
        r = ref[idx].to(seq)
        loss, mets = dpo_loss(seq[:, 0], seq[:, 1], r[:, 0], r[:, 1], self.cfg.beta,
                              self.cfg.dpo_loss)
        return loss, mets, tokens, ran

    def save(self, role, phase, opt, sched, step, finished=False):
        """The phase's state after `step` optimizer steps. Non-finite weights are never saved,
        so every checkpoint on disk is a good one to resume from."""
        params = self.trained_parameters(role)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise self.non_finite(role, phase, f"the weights went non-finite by step {step}")
        # saved as they are, not cloned: a full model's copy would double its memory here
        blob = {"params": [p.detach() for p in params],
                "optimizer": opt.state_dict() if opt else None,
                "scheduler": sched.state_dict() if sched else None,
                "step": step, "rng": self.rngs[role].state,
                "config": self.cfg.model_dump(mode="json")}
        atomic_torch_save(blob, self.state_path(role, phase))
        if finished:
            self.done_path(role, phase).write_text(str(step))

    def non_finite(self, role, phase, what: str) -> MaltError:
        """The one-line error that ends a run whose loss or weights went non-finite, naming the
        phase's last good checkpoint and its step."""
        path = self.state_path(role, phase)
        if not path.exists():
            return MaltError(f"{role} {phase}: {what}; this phase has no checkpoint yet")
        step = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"]
        return MaltError(f"{role} {phase}: {what}; the last good checkpoint is {path} "
                         f"(step {step})")

    def finish_step(self, bar, device, metrics: list[dict], t0: float, t_phase: float,
                    write: bool = True, **fields) -> dict:
        """One optimizer step's record (micro-batch metrics averaged, throughput, memory) to
        metrics.jsonl / TensorBoard and the progress bar."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        rec = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        rec.update(fields, step_s=dt, tokens_per_s=fields["tokens"] / max(dt, 1e-9),
                   peak_mem_mib=peak_memory_mib(device),
                   elapsed_s=time.perf_counter() - t_phase)
        if write:
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
