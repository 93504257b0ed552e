"""Tokenizers: Hugging Face directories (tokenizer.json or sentencepiece tokenizer.model) through
transformers, and the BPE vocabulary + merges + chat template embedded in a GGUF file."""

from __future__ import annotations

import functools
from pathlib import Path

from malt_fast.errors import MaltError, fail

# llama.cpp pre-tokenizer names -> the split regex applied before byte-level BPE.
# "smollm" isolates every digit first (SmolLM's tokenizer.json does the same); GPT-2's regex
# is the default. Patterns are the published ones of each tokenizer family.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_SPLITS = {"llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT],
                   "smollm": [r"\p{N}", GPT2_SPLIT], "gpt2": [GPT2_SPLIT], "default": [GPT2_SPLIT]}


class Tokenizer:
    """encode/decode plain text (no special tokens added) and render chat transcripts to ids."""

    def __init__(self, hf, chat_template: str | None, eos_token_ids: list[int], source):
        self.hf = hf  # a transformers tokenizer; used for decoding and template rendering
        self.chat_template = chat_template or getattr(hf, "chat_template", None)
        self.source = source
        ids = list(eos_token_ids) or ([hf.eos_token_id] if hf.eos_token_id is not None else [])
        self.eos_token_ids = sorted(set(ids))
        self.bos_token_id = hf.bos_token_id
        self.pad_token_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_token_ids[0]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @functools.cached_property
    def newline_ids(self) -> frozenset[int]:
        """Ids of the tokens whose text holds a line break: the only tokens after which a
        "line ends the reply" rule needs to look at the text (rollout's `stop_line`)."""
        texts = self.hf.batch_decode([[i] for i in range(self.vocab_size)])
        return frozenset(i for i, t in enumerate(texts) if "\n" in t)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def check_fits(self, vocab_size: int, model_source) -> None:
        """Every id this tokenizer can produce must have a row in the model's embedding: its
        size, its special tokens and what its chat template renders. A mismatch (a tokenizer
        from another model) is a one-line error, not an IndexError deep in the embedding (CPU)
        or a device assert (CUDA)."""
        special = [self.bos_token_id, self.pad_token_id, *self.eos_token_ids]
        template: list[int] = []
        if self.chat_template:
            template = self.apply_chat_template(
                [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}])
        top = max([self.vocab_size - 1, *[i for i in special + template if i is not None]])
        if top >= vocab_size:
            raise fail(self.source, f"token id {top} (the tokenizer has {self.vocab_size} tokens"
                                    f") is outside the model's vocabulary of {vocab_size} "
                                    f"({model_source}): the tokenizer does not belong to the "
                                    "model")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise MaltError(f"{self.source}: the tokenizer has no chat template")
        return self.hf.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True):
        """Token ids of the rendered transcript; special tokens come from the template itself."""
        return self.encode(self.chat_text(messages, add_generation_prompt))


def load_tokenizer(path) -> Tokenizer:
    """From an HF directory (tokenizer.json / tokenizer.model) or a `.gguf` file."""
    path = Path(path)
    if not path.exists():
        raise fail(path, "no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise fail(path, "expected a tokenizer directory or a .gguf file")
        return gguf_tokenizer(path)
    return hf_dir_tokenizer(path)


def hf_dir_tokenizer(model_dir: Path) -> Tokenizer:
    import json

    from transformers import AutoTokenizer

    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise fail(model_dir, "no tokenizer.json or tokenizer.model")
    try:
        hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise fail(model_dir, f"tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
    eos = []
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():  # chat models often stop on several ids, listed here
        value = json.loads(gen_cfg.read_text()).get("eos_token_id")
        eos = value if isinstance(value, list) else [value] if value is not None else []
    return Tokenizer(hf, None, eos, model_dir)


def gguf_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    from malt_fast.model.checkpoint import gguf_field, open_gguf

    reader = open_gguf(path)
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise fail(path, f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE "
                         "'gpt2'; use the model's tokenizer directory instead)")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = gguf_field(reader, "tokenizer.ggml.merges")
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not merges:
        raise fail(path, "GGUF file has no tokenizer vocabulary or merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    raw = RawTokenizer(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=False))
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    splits = GGUF_PRE_SPLITS.get(pre, GGUF_PRE_SPLITS["default"])
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    control = [tok for tok, t in zip(tokens, types) if t == 3]  # CONTROL tokens: <|im_start|>, ...
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(key):
        i = gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=token("bos"),
                                 eos_token=token("eos"), unk_token=token("unknown"),
                                 pad_token=token("padding"))
    eos_id = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    eot_id = gguf_field(reader, "tokenizer.ggml.eot_token_id")
    eos = [i for i in (eos_id, eot_id) if i is not None]
    return Tokenizer(hf, gguf_field(reader, "tokenizer.chat_template"), eos, path)
