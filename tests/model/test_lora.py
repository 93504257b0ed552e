"""LoRA adapters: zero init is the base model, merge equals the unmerged forward, PEFT round trip."""

import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from malt_fast.model import load_model, save_model
from malt_fast.model.lora import (LoRAConfig, add_adapter, adapter_parameters, load_adapter,
                                  merge_adapter, merged_model, save_adapter,
                                  set_adapter)


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tokens(seed=1):
    return torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(seed))


def test_zero_init_is_base_and_base_is_frozen(base_dir):
    model = load_model(base_dir)
    x = tokens()
    with torch.no_grad():
        base = model(x)
    add_adapter(model, "generator", LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(model(x), base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(adapter_parameters(model, "generator")) == 2 * 7 * 2  # A,B × 7 projections × 2 layers


def test_adapters_switch_and_merge(base_dir):
    model = load_model(base_dir)
    x = tokens()
    with torch.no_grad():
        base = model(x)
    add_adapter(model, "verifier", LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    add_adapter(model, "refiner", LoRAConfig(rank=2, alpha=2))
    assert all(p.requires_grad for p in adapter_parameters(model, "verifier"))
    randomize(model, "verifier", 1)
    randomize(model, "refiner", 2)
    with torch.no_grad():
        set_adapter(model, "verifier")
        v = model(x)
        set_adapter(model, "refiner")
        r = model(x)
        set_adapter(model, None)
        assert torch.equal(model(x), base)
    assert (v - base).abs().max() > 1e-3 and (r - v).abs().max() > 1e-3
    merge_adapter(model, "verifier")
    with torch.no_grad():
        assert (model(x) - v).abs().max().item() <= 1e-5


def test_peft_loads_our_adapter_with_same_logits(base_dir, tmp_path):
    from peft import PeftModel

    model = load_model(base_dir)
    add_adapter(model, "refiner", LoRAConfig(rank=4, alpha=16, targets=("q_proj", "k_proj",
                                                                       "o_proj", "down_proj")))
    randomize(model, "refiner", 3)
    save_adapter(model, "refiner", tmp_path / "adapter", base_model=str(base_dir))
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    x = tokens(4)
    with torch.no_grad():
        assert (hf.eval()(x).logits - model(x)).abs().max().item() <= 1e-5


def test_we_load_a_peft_adapter_with_same_logits(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"],
                                   init_lora_weights=False))
    hf.save_pretrained(tmp_path / "peft")
    model = load_model(base_dir)
    load_adapter(model, tmp_path / "peft", "generator")
    x = tokens(5)
    with torch.no_grad():
        assert (hf.eval()(x).logits - model(x)).abs().max().item() <= 1e-5


def test_save_model_with_adapters_writes_the_base(base_dir, tmp_path):
    model = load_model(base_dir)
    add_adapter(model, "generator", LoRAConfig(rank=2, alpha=4))
    randomize(model, "generator", 6)
    save_model(model, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    set_adapter(model, None)
    x = tokens(7)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_merged_model_equals_the_adapter_view_and_shares_the_rest(base_dir):
    model = load_model(base_dir)
    add_adapter(model, "verifier", LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    add_adapter(model, "refiner", LoRAConfig(rank=2, alpha=2))
    randomize(model, "verifier", 3)
    randomize(model, "refiner", 4)
    x = tokens(5)
    for name in ("verifier", "refiner", None):
        merged = merged_model(model, name)
        with torch.no_grad():
            set_adapter(model, name)
            want = model(x)
            got = merged(x)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)  # fp32, merge reorders sums
        assert not any(".lora_" in n for n, _ in merged.named_parameters())
    # the base is untouched and still serves its adapters; unadapted tensors are shared
    merged = merged_model(model, "verifier")
    assert merged.embed_tokens.weight is model.embed_tokens.weight
    assert merged.layers[0].mlp.up_proj.weight is model.layers[0].mlp.up_proj.base.weight
    assert merged.layers[0].self_attn.q_proj.weight is not \
        model.layers[0].self_attn.q_proj.base.weight
    with torch.no_grad():
        set_adapter(model, "verifier")
        torch.testing.assert_close(model(x), merged(x), rtol=0, atol=2e-5)


def test_adapters_stay_fp32_under_a_bf16_base(base_dir):
    model = load_model(base_dir, dtype=torch.bfloat16)
    add_adapter(model, "generator", LoRAConfig(rank=4, alpha=8))
    params = adapter_parameters(model, "generator")
    assert all(p.dtype == torch.float32 for p in params)
    randomize(model, "generator", 6)
    x = tokens(7)
    with torch.no_grad():
        out = model(x)
        ref = load_model(base_dir)  # fp32 reference with the same adapter values
        add_adapter(ref, "generator", LoRAConfig(rank=4, alpha=8))
        for p, q in zip(adapter_parameters(ref, "generator"), params):
            p.copy_(q)
        want = ref(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)
    # a small AdamW step survives in the fp32 adapter (in bf16 most of it would round away)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()
    moved = sum((p.detach() != b).sum().item() for p, b in zip(params, before))
    assert moved > 0.9 * sum(p.numel() for p in params)
