"""Datasets: packaged GSM8K / MATH / CommonsenseQA (and SVAMP, ASDiv, MAWPS test sets) and user JSONL."""

from malt_fast.data.assets import smollm2_gguf
from malt_fast.data.datasets import MATH_FAMILY, SPLITS, check_disjoint, load_dataset, load_split
from malt_fast.data.example import Example

__all__ = ["MATH_FAMILY", "SPLITS", "Example", "check_disjoint", "load_dataset", "load_split",
           "smollm2_gguf"]
