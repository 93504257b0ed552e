"""Model layer: the Llama, checkpoint I/O and tokenizers. Imports nothing above itself."""

from malt_fast.model.checkpoint import load_model, save_model
from malt_fast.model.dtypes import fast_dtype, resolve_dtype
from malt_fast.model.llama import KVCache, Llama, LlamaConfig
from malt_fast.model.tokenizer import Tokenizer, load_tokenizer

__all__ = ["KVCache", "Llama", "LlamaConfig", "Tokenizer", "fast_dtype", "load_model",
           "load_tokenizer", "resolve_dtype", "save_model"]
