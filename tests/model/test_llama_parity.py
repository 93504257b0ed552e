"""Our Llama against transformers' LlamaForCausalLM on random small configs, and HF round trips."""

import json

import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from malt_fast.model import load_model, save_model

CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_llama3_rope": dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0),
    "mqa_linear_rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def make_hf(name, seed=0):
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=211, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                   max_position_embeddings=128, rms_norm_eps=1e-6, **CONFIGS[name])
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms exercise the weight mapping
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def ids_batch(vocab, seed=1, B=3, T=37):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_match_transformers(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = ids_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
        hidden = ours.hidden_states(x)
    assert (out - ref).abs().max().item() <= 1e-4
    assert torch.allclose(hidden @ ours.lm_head.weight.T, out, atol=1e-5)
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_documented_bound(dtype, tmp_path):
    # Bound (docs/model.md): bf16 max |Δlogit| ≤ 0.05, fp16 ≤ 0.01 against transformers in the same
    # dtype on these unit-scale random models; both cast weights and run RMSNorm/RoPE tables in fp32.
    hf = make_hf("gqa_tied")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=dtype)
    hf = hf.to(dtype)
    x = ids_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref, out = hf(x).logits.float(), ours(x).float()
    assert out.dtype == torch.float32 and ours.embed_tokens.weight.dtype == dtype
    bound = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (out - ref).abs().max().item() <= bound


def test_save_then_transformers_loads_same_logits(tmp_path):
    hf = make_hf("gqa_llama3_rope", seed=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = ids_batch(hf.config.vocab_size, seed=5)
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max().item() <= 1e-5
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_tied_save_round_trip(tmp_path):
    hf = make_hf("gqa_tied", seed=4)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    again = load_model(tmp_path / "ours")
    x = ids_batch(hf.config.vocab_size, seed=6)
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["model_type"] == "llama"


def test_sharded_checkpoint(tmp_path):
    hf = make_hf("mha_untied", seed=7)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path)
    x = ids_batch(hf.config.vocab_size, seed=8)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_positions_and_cache_protocol_match_full_forward(tmp_path):
    """Prefill + per-token decode through KVCache equals one full forward (left padding too)."""
    from malt_fast.model.llama import KVCache

    hf = make_hf("gqa_tied", seed=9)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    x = ids_batch(hf.config.vocab_size, seed=10, B=2, T=20)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 2, 32, torch.float32, "cpu")
        cache.append_valid(torch.ones(2, 12, dtype=torch.bool))
        parts = [model(x[:, :12], torch.arange(12), cache)]
        for t in range(12, 20):
            cache.append_valid(torch.ones(2, 1, dtype=torch.bool))
            parts.append(model(x[:, t:t + 1], torch.tensor([t]), cache))
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4
