"""A Llama in one file: config, RoPE, attention, MLP, blocks, and a contiguous KV cache.

Parameter names equal Hugging Face's (minus the leading "model."), so checkpoints map 1:1.
Attention is delegated to a cache object when one is passed: the rollout engine plugs its
paged cache in through the same `attend(layer_idx, q, k, v)` call used by `KVCache` below.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional backend, used only for CUDA half-precision causal attention
    from flash_attn import flash_attn_func
except ImportError:  # the common case: SDPA
    flash_attn_func = None

_layer_ops = None


def fused_ops(x: torch.Tensor):
    """The fused Triton RMSNorm/RoPE/SiLU-mul kernels when they serve x: CUDA inference only
    (they have no backward; training and CPU use the torch ops below). Else None."""
    global _layer_ops
    if not x.is_cuda or torch.is_grad_enabled():
        return None
    if _layer_ops is None:
        from malt_fast.kernels import layer_ops

        _layer_ops = layer_ops
    return _layer_ops


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict = field(default_factory=dict)  # HF keys we carry through unchanged on save

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """Read a Hugging Face `config.json` dict (transformers 4 or 5 RoPE layout)."""
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
            if scaling["rope_type"] == "default":
                scaling = None
        known = {f for f in cls.__dataclass_fields__} - {"extra", "rope_scaling", "rope_theta"}
        kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
        kwargs.setdefault("num_key_value_heads", d.get("num_attention_heads", 32))
        skip = known | {"rope_scaling", "rope_theta", "rope_parameters", "architectures",
                        "model_type", "torch_dtype", "dtype", "transformers_version"}
        extra = {k: v for k, v in d.items() if k not in skip}
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling, extra=extra)

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_scaling")}
        d.update(self.extra)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d.update(architectures=["LlamaForCausalLM"], model_type="llama",
                 torch_dtype=str(dtype).removeprefix("torch."), hidden_act="silu")
        return d


# ---------------------------------------------------------------- rotary embeddings


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2] in fp32, with linear or Llama-3 scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if not s:
        return inv
    kind = s["rope_type"]
    if kind == "linear":
        return inv / s["factor"]
    if kind == "freq_factors":  # per-pair divisors as stored by GGUF files (rope_freqs.weight)
        return inv / torch.tensor(s["factors"], dtype=torch.float32)
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # long wavelengths are slowed by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        blend = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - blend) * scaled / factor + blend * scaled
        in_band = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(in_band, blended, scaled)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [..., T, head_dim] for integer `positions` [..., T], computed in fp32."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, heads, T, D] by half-split pairs (d, d + D/2); cos/sin [B or 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := fused_ops(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        # normalise in fp32 so bf16/fp16 activations do not lose the variance
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def attention(q, k, v, mask=None):
    """Causal attention (mask=None) or attention under a bool mask [B|1, 1|H, T, S], True = attend.

    q [B, H, T, D]; k, v [B, Hkv, S, D] with H a multiple of Hkv (grouped-query).
    """
    if (flash_attn_func is not None and mask is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=b)

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        rope = apply_rope if (ops := fused_ops(x)) is None else ops.apply_rope
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v)
        else:
            out = attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        if (ops := fused_ops(x)) is not None:
            return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def hidden_states(self, input_ids, positions=None, cache=None, mask=None):
        """Final normed hidden states [B, T, H]; `positions` [B, T] or [T] default to 0..T-1."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        return self.norm(x)

    def forward(self, input_ids, positions=None, cache=None, mask=None):
        """Logits [B, T, V] in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, mask))


# ---------------------------------------------------------------- contiguous KV cache


class KVCache(nn.Module):
    """Preallocated [B, Hkv, max_len, D] keys/values per layer for batch decoding.

    Rows are left-padded to a common length; `valid` [B, max_len] marks real tokens so padding
    is never attended. `length` advances after the last layer of each forward.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype, device):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_layers, self.max_len, self.length = cfg.num_hidden_layers, max_len, 0

    def append_valid(self, valid: torch.Tensor):
        """Mark which of the next T tokens [B, T] are real before the forward that writes them."""
        T = valid.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_len {self.max_len}")
        self.valid[:, self.length:self.length + T] = valid

    def attend(self, layer_idx, q, k, v):
        start, T = self.length, q.shape[2]
        end = start + T
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        key_pos = torch.arange(end, device=q.device)
        query_pos = torch.arange(start, end, device=q.device)
        causal = key_pos[None, :] <= query_pos[:, None]
        # a padding query still sees itself: an all-masked row would turn into NaN keys downstream
        own = key_pos[None, :] == query_pos[:, None]
        mask = causal[None, None] & (self.valid[:, None, None, :end] | own[None, None])
        out = attention(q, self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end], mask)
        if layer_idx == self.n_layers - 1:
            self.length = end
        return out
