"""setup.sh's last step: every runtime dependency imports and the packaged model and datasets
open. Exit status 1 with one line per problem otherwise (setup.sh then writes no stamp)."""

import importlib
import sys

# import name -> what to install (requirements.txt, or the step of setup.sh that installs it)
MODULES = {"torch": "torch", "triton": "triton", "transformers": "transformers",
           "tokenizers": "tokenizers", "sentencepiece": "sentencepiece",
           "safetensors": "safetensors", "gguf": "gguf", "google.protobuf": "protobuf",
           "accelerate": "accelerate", "yaml": "pyyaml", "tqdm": "tqdm",
           "tensorboard": "tensorboard", "jinja2": "jinja2", "numpy": "numpy",
           "matplotlib": "matplotlib", "peft": "peft", "pydantic": "pydantic",
           "deepspeed": "deepspeed", "malt_fast._C": "malt_fast (pip install -e .)",
           "malt_fast.kernels": "malt_fast (pip install -e .)"}


def main() -> int:
    problems = []
    for module, dist in MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # an import can fail with any error, not only ImportError
            problems.append(f"cannot import {module} ({type(e).__name__}: {e}); install {dist}")
    if not problems:
        from malt_fast.data import load_dataset, smollm2_gguf
        from malt_fast.errors import MaltError

        try:
            with open(smollm2_gguf(), "rb") as f:
                if f.read(4) != b"GGUF":
                    problems.append(f"{smollm2_gguf()}: not a GGUF file")
            for name, split in (("gsm8k", "test"), ("math", "test"), ("csqa", "test")):
                if not load_dataset(name, split):
                    problems.append(f"packaged dataset {name} {split} is empty")
        except MaltError as e:
            problems.append(str(e))
    for p in problems:
        print(f"setup.sh: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
