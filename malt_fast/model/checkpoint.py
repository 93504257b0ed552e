"""Checkpoint I/O: Hugging Face Llama directories (safetensors, sharded or not), GGUF files,
and saving in Hugging Face format. Every failure names the file and the problem."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from malt_fast.errors import MaltError, fail
from malt_fast.model.llama import Llama, LlamaConfig, rope_inv_freq

LLAMA_ARCHS = {"LlamaForCausalLM"}


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """Load a Llama from an HF directory (config.json + safetensors) or a `.gguf` file."""
    path = Path(path)
    if not path.exists():
        raise fail(path, "no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise fail(path, "expected a Hugging Face model directory or a .gguf file")
        cfg, tensors = read_gguf_weights(path)
    else:
        cfg = read_hf_config(path)
        tensors = read_hf_weights(path)
    return build_model(cfg, tensors, path, dtype, device)


def build_model(cfg: LlamaConfig, tensors: dict, source, dtype, device) -> Llama:
    """Instantiate without initialising, then assign checked tensors (HF names minus "model.")."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise fail(source, f"missing tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise fail(source, f"unexpected tensor {unexpected[0]} ({len(unexpected)} in all); "
                           "is this a Llama checkpoint?")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise fail(source, f"tensor {name} has shape {tuple(tensors[name].shape)}, "
                               f"the config implies {tuple(ref.shape)}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


# ---------------------------------------------------------------- Hugging Face directories


def read_hf_config(model_dir: Path) -> LlamaConfig:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise fail(model_dir, "no config.json (not a Hugging Face model directory)")
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise fail(cfg_path, f"invalid JSON: {e}") from None
    archs = set(d.get("architectures") or [])
    if d.get("model_type") != "llama" and not archs & LLAMA_ARCHS:
        found = d.get("model_type") or sorted(archs) or "unknown"
        raise fail(cfg_path, f"architecture {found} is not supported (only Llama)")
    try:
        return LlamaConfig.from_hf(d)
    except (TypeError, ValueError, KeyError) as e:
        raise fail(cfg_path, f"bad Llama config: {e}") from None


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise fail(index, f"not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise fail(model_dir, "no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        f = model_dir / name
        if not f.is_file():
            raise fail(f, "listed in the safetensors index but missing")
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    tensors[key.removeprefix("model.")] = st.get_tensor(key)
        except Exception as e:  # safetensors raises its own types for truncation/corruption
            raise fail(f, f"unreadable safetensors file ({type(e).__name__}: {e})") from None
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def save_model(model: Llama, out_dir, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that transformers' LlamaForCausalLM loads.

    Files are written under temporary names and renamed, so a crash leaves no half file.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "freq_factors":
        raise MaltError("rope frequency factors from a GGUF file have no Hugging Face config form")
    dtype = dtype or next(model.parameters()).dtype
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings or ".lora_" in name:
            continue  # adapters are saved on their own (lora.save_adapter), base weights here
        name = name.replace(".base.", ".")
        key = name if name == "lm_head.weight" else f"model.{name}"
        state[key] = t.detach().to("cpu", dtype).contiguous()
    _atomic_write(out_dir / "model.safetensors", lambda p: save_file(state, p, {"format": "pt"}))
    text = json.dumps(cfg.to_hf(dtype), indent=2)
    _atomic_write(out_dir / "config.json", lambda p: Path(p).write_text(text))
    return out_dir


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- GGUF


GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncated files
        raise fail(path, f"not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, path: Path) -> LlamaConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise fail(path, f"architecture {arch!r} is not supported (only llama)")

    def need(key):
        value = gguf_field(reader, f"llama.{key}")
        if value is None:
            raise fail(path, f"GGUF metadata lacks llama.{key}")
        return value

    n_heads = need("attention.head_count")
    hidden = need("embedding_length")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    scaling = None
    if gguf_field(reader, "llama.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": gguf_field(reader, "llama.rope.scaling.factor")}
    return LlamaConfig(
        vocab_size=gguf_field(reader, "llama.vocab_size") or len(tokens),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=gguf_field(reader, "llama.attention.head_count_kv", n_heads),
        head_dim=gguf_field(reader, "llama.attention.key_length", hidden // n_heads),
        rms_norm_eps=gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=gguf_field(reader, "llama.rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=gguf_field(reader, "llama.context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (pairs interleaved per head) back to HF's half-split order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_weights(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    from gguf.quants import dequantize

    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    tensors = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama-3.1 GGUFs store the scaled RoPE divisors
            factors = dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64).tolist()
            cfg.rope_scaling = {"rope_type": "freq_factors", "factors": factors}
            continue
        if t.name in GGUF_NAMES:
            name = GGUF_NAMES[t.name]
        else:
            parts = t.name.split(".")  # blk.N.kind.weight
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in GGUF_BLOCK_NAMES:
                raise fail(path, f"unexpected tensor {t.name}; is this a Llama GGUF?")
            name = f"layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
        shape = [int(d) for d in reversed(t.shape.tolist())]  # GGUF lists dims innermost first
        try:
            w = dequantize(t.data, t.tensor_type).reshape(shape)
        except Exception as e:
            raise fail(path, f"tensor {t.name} cannot be read ({type(e).__name__}: {e})") from None
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_key_value_heads)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # owned, writable
    return cfg, tensors
