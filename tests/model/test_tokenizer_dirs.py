"""Tokenizer directories: a sentencepiece tokenizer.model (Llama-2 style) and a tokenizer.json."""

import json

import pytest

from malt_fast.data import load_dataset
from malt_fast.errors import MaltError
from malt_fast.model import load_tokenizer


@pytest.fixture(scope="module")
def texts():
    return [ex.question for ex in load_dataset("gsm8k", "train")[:300]]


def test_sentencepiece_model_ids_equal_sentencepiece(tmp_path, texts):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
        # Llama-2's normaliser: identity, whitespace kept as written, a dummy prefix space
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False, "legacy": False}))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    held_out = [ex.question for ex in load_dataset("gsm8k", "test")[:100]]
    for t in texts[:100] + held_out:
        assert tok.encode(t) == sp.encode(t), t
        assert tok.decode(tok.encode(t)) == t
    assert tok.eos_token_ids == [2] and tok.bos_token_id == 1


def test_tokenizer_json_directory(tmp_path, smollm_gguf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path)
    for t in ["Hello world", "It costs $12.50, i.e. 3 x 4."]:
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False)
    msgs = [{"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(MaltError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
