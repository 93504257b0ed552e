"""LoRA adapters, several per model (one per MALT role) over one frozen base, in PEFT's format.

`add_adapter(model, "verifier", LoRAConfig(...))` wraps the target projections once and adds a
named pair (A, B) to each; `set_adapter(model, name)` picks which one the forward uses (None: the
bare base). Adapters are saved as `adapter_config.json` + `adapter_model.safetensors` with PEFT's
key names, so `peft.PeftModel.from_pretrained(LlamaForCausalLM, dir)` loads them.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from malt_fast.errors import fail
from malt_fast.model.llama import Llama

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# the MultiAdapterView whose forward is running: while set, every LoRALinear adds the adapter
# of each batch row as routed there, instead of its `active` one (training never sets it)
_routing: MultiAdapterView | None = None


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_PROJECTIONS
    extra: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus named low-rank updates; the active one is added to the output."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self.active: str | None = None

    @property
    def weight(self):  # so code that reads `proj.weight` (e.g. dtype probes) keeps working
        return self.base.weight

    def add(self, name: str, cfg: LoRAConfig):
        w = self.base.weight
        # at least fp32 under a bf16/fp16 base: an AdamW step of lr 1e-4 on an A entry of ~0.04
        # is below bf16's resolution there (2^-8 relative) and would be rounded away
        dtype = torch.promote_types(w.dtype, torch.float32)
        a = torch.empty(cfg.rank, w.shape[1], dtype=dtype, device=w.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # B = 0 makes the initial update zero
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(w.shape[0], cfg.rank, dtype=dtype,
                                                     device=w.device))
        self.scaling[name] = cfg.scaling
        self.dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def forward(self, x):
        out = self.base(x)
        if _routing is not None:
            return _routing.add_routed(self, x, out)
        if self.active is None:
            return out
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        x = self.dropout[self.active](x).to(a.dtype)
        return out + ((x @ a.T @ b.T) * self.scaling[self.active]).to(out.dtype)


def lora_modules(model: Llama) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_adapter(model: Llama, name: str, cfg: LoRAConfig) -> None:
    """Add adapter `name` on every target projection; freezes the base weights."""
    for n, p in model.named_parameters():
        if ".lora_" not in n:  # earlier adapters stay trainable
            p.requires_grad_(False)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for attr, child in list(parent.named_children()):
                if attr not in cfg.targets:
                    continue
                if not isinstance(child, LoRALinear):
                    child = LoRALinear(child)
                    setattr(parent, attr, child)
                if name in child.lora_A:
                    raise ValueError(f"adapter {name!r} already exists")
                child.add(name, cfg)
    model.lora_configs = {**getattr(model, "lora_configs", {}), name: cfg}
    set_adapter(model, name)


def set_adapter(model: Llama, name: str | None) -> None:
    """Make `name` the adapter used by the forward (None: the base model alone)."""
    if name is not None and name not in getattr(model, "lora_configs", {}):
        raise ValueError(f"no adapter {name!r}; have {sorted(getattr(model, 'lora_configs', {}))}")
    for m in lora_modules(model).values():
        m.active = name if name in m.lora_A else None


def adapter_parameters(model: Llama, name: str) -> list[nn.Parameter]:
    params = []
    for m in lora_modules(model).values():
        if name in m.lora_A:
            params += [m.lora_A[name], m.lora_B[name]]
    return params


def adapter_state_dict(model: Llama, name: str) -> dict[str, torch.Tensor]:
    """PEFT key names: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    state = {}
    for path, m in lora_modules(model).items():
        if name in m.lora_A:
            prefix = f"base_model.model.model.{path}"
            state[f"{prefix}.lora_A.weight"] = m.lora_A[name].detach()
            state[f"{prefix}.lora_B.weight"] = m.lora_B[name].detach()
    return state


@torch.no_grad()
def merge_adapter(model: Llama, name: str) -> None:
    """Fold adapter `name` into the base weights and drop all LoRA wrappers (for export)."""
    for path, m in lora_modules(model).items():
        if name in m.lora_A:
            m.base.weight += m.delta_weight(name).to(m.base.weight.dtype)
        parent = model.get_submodule(path.rsplit(".", 1)[0])
        setattr(parent, path.rsplit(".", 1)[1], m.base)
    model.lora_configs = {}


@torch.no_grad()
def merged_model(model: Llama, name: str | None) -> Llama:
    """A plain Llama computing what `model` computes through adapter `name`, for inference.

    Decoding through a LoRA wrapper costs two extra small matmuls and some Python per projection
    (a trained SmolLM2 G->V->R evaluation on CPU: 81-95 s through the adapters, 73 s merged). Every
    tensor outside the adapted projections (embeddings, norms, the base itself) is shared with
    `model`; each adapted projection gets a new weight W + scaling * B @ A.
    """
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    out = copy.deepcopy(model, memo=shared)
    for path, m in lora_modules(out).items():
        w = m.base.weight
        if name in m.lora_A:
            w = nn.Parameter(w + m.delta_weight(name).to(w.dtype), requires_grad=False)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=m.base.bias is not None,
                           device="meta")
        linear.weight, linear.bias = w, m.base.bias
        parent = out.get_submodule(path.rsplit(".", 1)[0])
        setattr(parent, path.rsplit(".", 1)[1], linear)
    out.lora_configs = {}
    return out


def save_adapter(model: Llama, name: str, out_dir, base_model: str = "") -> Path:
    from safetensors.torch import save_file

    from malt_fast.model.checkpoint import _atomic_write

    cfg = model.lora_configs[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
    _atomic_write(out_dir / "adapter_model.safetensors",
                  lambda p: save_file(state, p, {"format": "pt"}))
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, **cfg.extra,
    }
    text = json.dumps(peft_cfg, indent=2)
    _atomic_write(out_dir / "adapter_config.json", lambda p: Path(p).write_text(text))
    return out_dir


def load_adapter(model: Llama, adapter_dir, name: str) -> None:
    """Add adapter `name` from a PEFT-format directory (ours or PEFT's own save)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (cfg_path, weights):
        if not f.is_file():
            raise fail(f, "missing (not a PEFT LoRA adapter directory)")
    d = json.loads(cfg_path.read_text())
    if d.get("peft_type") != "LORA" or d.get("use_dora") or d.get("use_rslora"):
        raise fail(cfg_path, "only plain LoRA adapters are supported")
    targets = d["target_modules"]
    targets = tuple(targets) if isinstance(targets, list) else tuple(
        t for t in ALL_PROJECTIONS if t in str(targets))
    cfg = LoRAConfig(rank=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                     targets=targets)
    add_adapter(model, name, cfg)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise fail(weights, f"unreadable safetensors file ({type(e).__name__}: {e})") from None
    modules = lora_modules(model)
    seen = set()
    for key, t in state.items():
        path = key.removeprefix("base_model.model.model.")
        path, kind = path.rsplit(".", 2)[0], path.rsplit(".", 2)[1]
        path = path.removesuffix(f".{name}")
        if path not in modules or kind not in ("lora_A", "lora_B"):
            raise fail(weights, f"unexpected tensor {key}")
        target = getattr(modules[path], kind)[name]
        if target.shape != t.shape:
            raise fail(weights, f"tensor {key} has shape {tuple(t.shape)}, expected "
                                f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t)
        seen.add((path, kind))
    expected = {(p, k) for p, m in modules.items() if name in m.lora_A for k in ("lora_A", "lora_B")}
    if seen != expected:
        missing = sorted(expected - seen)[0]
        raise fail(weights, f"missing tensor for {missing[0]}.{missing[1]}")


class _View(nn.Module):
    """The shared base model as an engine sees it: its config, embeddings and head, with every
    forward run through `_run` (which adapters apply is the subclass's)."""

    def __init__(self, model: Llama):
        super().__init__()
        self.inner, self.config = model, model.config

    @property
    def lm_head(self):
        return self.inner.lm_head

    @property
    def embed_tokens(self):
        return self.inner.embed_tokens

    def _run(self, fn, *args, **kwargs):
        raise NotImplementedError

    def hidden_states(self, *args, **kwargs):
        return self._run(self.inner.hidden_states, *args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._run(self.inner, *args, **kwargs)


class AdapterView(_View):
    """The shared base seen through one adapter: every forward runs with `name` active.

    Lets a rollout engine per role share one base model in memory (None: the bare base)."""

    def __init__(self, model: Llama, name: str | None):
        super().__init__(model)
        self.adapter = name

    def _run(self, fn, *args, **kwargs):
        set_adapter(self.inner, self.adapter)
        return fn(*args, **kwargs)


class MultiAdapterView(_View):
    """The shared base with several adapters at once: batch row i of a forward goes through
    adapter names[ids[i]] for the ids of the last `route(ids)` (S-LoRA / Punica style).

    Every adapted projection computes its base output with one matmul over the whole batch and
    adds each row's low-rank update grouped by adapter: on CUDA two Triton kernels
    (kernels/lora_grouped.py) that read the adapter of each row from a fixed device buffer, so a
    captured CUDA graph replays with the routing of the latest `route`; on CPU every adapter's A
    side by side in one matmul, a mask keeping each row's own adapter's columns, and one matmul
    with the B's. Rows routed to None, and rows past the routed ones (a fixed-shape step's
    padding), get the bare base.

    The adapters are copied (stacked, scaling folded in) when the view is built, as
    `merged_model` does: build a new view after training them further. Inference only (no
    gradient reaches the adapters); `set_adapter` and the training forward are unaffected.
    backend: "triton" or "torch" (default: "triton" on CUDA, else "torch"); "triton" on CPU
    tensors needs TRITON_INTERPRET=1 (tests)."""

    def __init__(self, model: Llama, names: list[str | None], max_rows: int = 1024,
                 backend: str | None = None):
        super().__init__(model)
        names = list(names)
        configs = getattr(model, "lora_configs", {})
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat: {names}")
        if unknown := [n for n in names if n is not None and n not in configs]:
            raise ValueError(f"no adapter {unknown[0]!r}; have {sorted(configs)}")
        device = model.embed_tokens.weight.device
        backend = backend or ("triton" if device.type == "cuda" else "torch")
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
        self.names, self.backend, self.max_rows = names, backend, max_rows
        adapters = [n for n in names if n is not None]
        self._slot = [adapters.index(n) if n is not None else -1 for n in names]
        # per batch row: the adapter's slot in the stacks, -1 for none; written in place only
        self.ids = torch.full((max_rows,), -1, dtype=torch.int32, device=device)
        self._masks: dict[tuple, torch.Tensor] = {}  # torch backend: ranks -> row masks
        self._n_routed = 0
        self._stacks = {m: self._stack(m, adapters) for m in lora_modules(model).values()
                        if any(n in m.lora_A for n in adapters)}
        self._dtype = next((st[0].dtype for st in self._stacks.values()), torch.float32)

    @torch.no_grad()
    def _stack(self, m: LoRALinear, adapters: list[str]):
        """One projection's adapters, scaling folded into B. Triton: (A [n, R, in], B [n, out,
        R]) zero-padded to a rank tile; torch: (A [sum r, in], B [out, sum r], ranks), the
        adapters' ranks side by side. An adapter that does not adapt m has rank 0 there."""
        ranks = tuple(m.lora_A[n].shape[0] if n in m.lora_A else 0 for n in adapters)
        dtype = next(m.lora_A[n].dtype for n in adapters if n in m.lora_A)
        out_f, in_f = m.base.weight.shape
        dev = m.base.weight.device
        if self.backend == "torch":
            # in the base's dtype: a bf16 model's update then costs bf16 matmuls (the adapters
            # train in fp32; rounding them to bf16 errs no more than merging them into bf16
            # weights does); the activations are not converted either
            dtype = m.base.weight.dtype
            a = torch.cat([m.lora_A[n] for n in adapters if n in m.lora_A]).to(dtype)
            b = torch.cat([m.lora_B[n] * m.scaling[n] for n in adapters if n in m.lora_A], 1)
            return a, b.to(dtype), ranks
        from malt_fast.kernels.lora_grouped import rank_tile

        r_max = rank_tile(max(ranks))
        a = torch.zeros(len(adapters), r_max, in_f, dtype=dtype, device=dev)
        b = torch.zeros(len(adapters), out_f, r_max, dtype=dtype, device=dev)
        for j, n in enumerate(adapters):
            if ranks[j]:
                a[j, : ranks[j]] = m.lora_A[n]
                b[j, :, : ranks[j]] = m.lora_B[n] * m.scaling[n]
        return a, b, ranks

    def index(self, name: str | None) -> int:
        """Position of `name` in names (the id `route` takes for it)."""
        if name not in self.names:
            raise ValueError(f"adapter {name!r} is not in this view's names {self.names}")
        return self.names.index(name)

    def route(self, ids: list[int]) -> None:
        """Adapter index (into names) of each batch row of the next forward(s); rows past
        len(ids) get none."""
        ids = list(ids)
        if len(ids) > self.max_rows:
            raise ValueError(f"{len(ids)} rows routed; this view holds at most {self.max_rows} "
                             "(max_rows)")
        if bad := [i for i in ids if not 0 <= i < len(self.names)]:
            raise ValueError(f"adapter index {bad[0]} out of range for names {self.names}")
        slots = [self._slot[i] for i in ids]
        host = torch.full((self.max_rows,), -1, dtype=torch.int32)
        host[: len(slots)] = torch.tensor(slots, dtype=torch.int32)
        self.ids.copy_(host)  # in place: a captured graph reads this very buffer
        self._n_routed = len(slots)
        if self.backend == "torch":
            # per row, ones on its adapter's columns of the side-by-side ranks (built once per
            # routing, not once per projection; one mask per rank layout, usually one)
            self._masks = {}
            for ranks in {st[2] for st in self._stacks.values()}:
                starts = [sum(ranks[:j]) for j in range(len(ranks))]
                mask = torch.zeros(self.max_rows, 1, sum(ranks), dtype=self._dtype)
                for i, j in enumerate(slots):
                    if j >= 0:
                        mask[i, 0, starts[j]: starts[j] + ranks[j]] = 1
                self._masks[ranks] = mask.to(self.ids.device)

    def add_routed(self, m: LoRALinear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (= m.base(x)) plus each routed row's update of projection m, in place."""
        stack = self._stacks.get(m)
        if stack is None:  # none of the names adapts this projection
            return out
        if not self._n_routed <= x.shape[0] <= self.max_rows:
            raise ValueError(f"a forward of {x.shape[0]} rows, {self._n_routed} routed "
                             f"(max_rows {self.max_rows})")
        a, b, ranks = stack
        if self.backend == "triton":
            from malt_fast.kernels.lora_grouped import add_grouped_lora_

            return add_grouped_lora_(out, x, self.ids, a, b)
        # every adapter's A at once, each row keeping its own adapter's columns: three ops per
        # projection however many adapters the batch mixes (a product per adapter group costs
        # ~4 small ops each, which at decode sizes is launch time, not arithmetic)
        u = (x.to(a.dtype) @ a.T).mul_(self._masks[ranks][: x.shape[0]])
        return out.add_((u @ b.T).to(out.dtype))

    def _run(self, fn, *args, **kwargs):
        global _routing
        if _routing is not None:
            raise RuntimeError("a MultiAdapterView forward is already running")
        _routing = self
        try:
            return fn(*args, **kwargs)
        finally:
            _routing = None
