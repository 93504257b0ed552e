"""The models a run decodes and trains with: the base model and tokenizer, loaded once and
shared by every round, each role's trained weights (LoRA adapters on the shared base, or with
full fine-tuning the role's own model), and the rollout engines over them."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from malt_fast import ranks
from malt_fast.config import STAR, train_config
from malt_fast.errors import fail
from malt_fast.model.dtypes import placement
from malt_fast.phases import phase

ROLES = ("generator", "verifier", "refiner")


class Models:
    def __init__(self, cfg: dict):
        from malt_fast.data import smollm2_gguf

        self.cfg = cfg
        self.path = cfg["model"] or smollm2_gguf()
        self._model = self._tok = None
        self.roles: dict = {}  # full fine-tuning: role -> its trained model

    @property
    def model(self):
        """The base model (loaded on first use)."""
        if self._model is None:
            from malt_fast.model import load_model

            with phase("load") as p:
                model = load_model(self.path, *self.placement())
                p.count()
            self.tok.check_fits(model.config.vocab_size, self.path)
            self._model = model
        return self._model

    @property
    def tok(self):
        if self._tok is None:
            from malt_fast.model import load_tokenizer

            with phase("load") as p:
                self._tok = load_tokenizer(self.cfg["tokenizer"] or self.path)
                p.count()
        return self._tok

    def placement(self) -> tuple:
        dtype, device = placement(self.cfg["dtype"], self.cfg["device"], "config")
        return dtype, ranks.device(device)  # across ranks, rank r decodes on cuda:LOCAL_RANK

    def release(self) -> None:
        """Drop the models (the base loads again on next use), e.g. so that a training
        subprocess gets the memory."""
        self._model, self.roles = None, {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- engines

    def engine(self, adapter=None, progress=True, model=None):
        """An engine on `model` (default: the base) seen through `adapter` (None: no adapter).
        With engine.merge_adapters the engine decodes a merged copy of the adapted projections
        (faster; one more copy of them per engine), else through the LoRA wrappers."""
        from malt_fast.model.lora import AdapterView, merged_model

        model = self.model if model is None else model
        view = merged_model(model, adapter) if self.cfg["engine"]["merge_adapters"] else \
            AdapterView(model, adapter)
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
        if role in self.roles:
            return self.engine(model=self.roles[role])
        return self.engine(role if role in getattr(self.model, "lora_configs", {}) else None)

    def role_engines(self, extra: tuple = ()) -> dict:
        """role -> what decodes it, for the three roles and `extra` ones (e.g. STaR's agent).

        Trained LoRA roles with engine.multi_adapter share one engine whose batches mix rows
        of every adapter (role -> (engine, adapter)); otherwise each role has its own engine."""
        roles = list(ROLES) + list(extra)
        lora = getattr(self.model, "lora_configs", {})
        adapters = {r: r if r in lora else None for r in roles}
        if self.cfg["engine"]["multi_adapter"] and not self.roles and any(adapters.values()):
            from malt_fast.model.lora import MultiAdapterView

            names = [None] + [r for r in roles if adapters[r]]
            view = MultiAdapterView(self.model, names,
                                    max_rows=max(1024, self.cfg["engine"]["max_batch"]))
            engine = self._engine(view)
            return {r: (engine, adapters[r]) for r in roles}
        return {r: self.role_engine(r) for r in roles}

    # ---------------------------------------------------------------- trained roles

    def use_roles(self, ckpt_dir) -> list[str]:
        """Make the trained roles in ckpt_dir/{role}/ the ones role_engines() decodes with: PEFT
        adapters copied into the shared base (LoRA), or HF models loaded (full fine-tuning).
        Returns the roles found."""
        from malt_fast.model import load_model

        if train_config(self.cfg).finetune == "lora":
            return use_adapters(self.model, ckpt_dir)
        ckpt_dir = Path(ckpt_dir)
        roles = [r for r in ROLES + (STAR,) if (ckpt_dir / r / "config.json").is_file()]
        if not roles:
            raise fail(ckpt_dir, "no trained role models here (is the previous round finished?)")
        self.roles = {}  # the old ones go before the new ones load
        gc.collect()
        for r in roles:
            self.roles[r] = load_model(ckpt_dir / r, *self.placement())
        return roles


def use_adapters(model, ckpt_dir) -> list[str]:
    """Make the model's role adapters equal the PEFT adapters in ckpt_dir/{role}/: loaded when
    the model lacks the role's adapter, copied into it when it has one. Returns the roles."""
    from safetensors.torch import load_file

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
