"""The packaged SmolLM2-135M-Instruct GGUF: our loader and tokenizer against transformers'."""

import random

import pytest
import torch

from malt_fast.data import load_dataset
from malt_fast.model import load_model, load_tokenizer
from malt_fast.model.generate import greedy_generate


@pytest.fixture(scope="module")
def ours(smollm_gguf):
    return load_model(smollm_gguf), load_tokenizer(smollm_gguf)


@pytest.fixture(scope="module")
def reference(smollm_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(smollm_gguf.parent, **kw)


def real_texts(n_each=100, seed=0):
    rng = random.Random(seed)
    texts = []
    for name, split in [("gsm8k", "test"), ("math", "test"), ("csqa", "validation")]:
        rows = load_dataset(name, split)
        texts += [ex.question for ex in rng.sample(rows, n_each)]
    return texts


def test_config_read_from_gguf(ours):
    cfg = ours[0].config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert 134e6 < sum(p.numel() for p in ours[0].parameters()) < 136e6


def test_logits_match_transformers_gguf_loader(ours, reference):
    model, tok = ours
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in real_texts(2)]
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            assert (model(x) - reference[0](x).logits).abs().max().item() <= 1e-4


def test_tokenizer_matches_transformers_with_smollm_digit_split(ours, reference):
    """transformers' GGUF converter ignores the 'smollm' pre-tokenizer (digits split one by one,
    as in SmolLM's own tokenizer.json and llama.cpp). Give the reference that split, then all ids
    must agree; texts without digits must agree even without it."""
    from tokenizers import pre_tokenizers

    tok, ref = ours[1], reference[1]
    texts = real_texts(100)
    no_digits = [t for t in texts if not any(c.isdigit() for c in t)]
    assert len(no_digits) > 50
    for t in no_digits:
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False), t
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for t in texts:
        ids = tok.encode(t)
        assert ids == ref.encode(t, add_special_tokens=False), t
        assert tok.decode(ids) == t
    assert tok.encode("1234") == [tok.encode(d)[0] for d in "1234"]


def test_chat_template_applied(ours):
    tok = ours[1]
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert ids.count(tok.encode("<|im_start|>")[0]) == 3  # special tokens map to single ids


def test_greedy_answers_a_factual_question(ours):
    model, tok = ours
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in ["What is the capital of France?", "What is the capital of Japan?"]]
    outs = greedy_generate(model, prompts, 24, tok.eos_token_ids, tok.pad_token_id)
    assert "Paris" in tok.decode(outs[0])
    assert "Tokyo" in tok.decode(outs[1])


def test_batched_greedy_equals_unbatched(ours):
    """Left padding in the contiguous cache does not change any row's tokens."""
    model, tok = ours
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in real_texts(1)]
    batched = greedy_generate(model, prompts, 12, tok.eos_token_ids, tok.pad_token_id)
    for p, b in zip(prompts, batched):
        assert greedy_generate(model, [p], 12, tok.eos_token_ids, tok.pad_token_id)[0] == b
