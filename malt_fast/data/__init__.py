"""Datasets: packaged GSM8K / MATH / CommonsenseQA (and SVAMP, ASDiv, MAWPS test sets) and user JSONL."""

from malt_fast.data.assets import smollm2_gguf
from malt_fast.data.datasets import MATH_FAMILY, SPLITS, Example, load_dataset

__all__ = ["MATH_FAMILY", "SPLITS", "Example", "load_dataset", "smollm2_gguf"]
