import os

# Triton kernels run on CPU tensors through the interpreter; this must precede any @triton.jit import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm_gguf():
    """Path of the packaged SmolLM2-135M-Instruct GGUF file."""
    from malt_fast.data.assets import smollm2_gguf

    return smollm2_gguf()
