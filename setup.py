"""Installs malt_fast (kernels/ as malt_fast.kernels) and builds csrc/*.cpp into malt_fast._C.

Build with `pip install --no-build-isolation .`: an isolated build would fetch a CUDA torch.

The extension targets the x86-64 baseline, so a build copied to another machine (a container
image, a cluster) runs on any x86-64 CPU; its AVX2 and AVX-512 kernels are compiled for their
own instruction sets and chosen at run time (csrc/cpu_isa.h). MALT_FAST_NATIVE=1 adds
-march=native (the rest of the code tuned for the building CPU; not portable).
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

PACKAGES = ["malt_fast", "malt_fast.model", "malt_fast.data", "malt_fast.rollout",
            "malt_fast.malt", "malt_fast.train", "malt_fast.eval", "malt_fast.kernels"]

ext = CppExtension(
    "malt_fast._C",
    sorted(glob.glob("csrc/*.cpp")),
    extra_compile_args=["-O3", "-fopenmp", "-std=c++17"]
    + (["-march=native"] if os.environ.get("MALT_FAST_NATIVE") == "1" else []),
    extra_link_args=["-fopenmp"],
)

setup(
    name="malt-fast",
    version="0.1.0",
    description="MALT multi-agent LLM training: shared-prefix rollout, fused log-prob kernels",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"malt_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.4", "triton>=3.0", "transformers>=4.46", "sentencepiece", "safetensors",
        "deepspeed>=0.15", "gguf>=0.10", "protobuf", "accelerate", "pyyaml", "tqdm", "jinja2",
        "numpy", "pydantic>=2.5", "peft", "matplotlib",
    ],
    extras_require={"flash": ["flash-attn"], "test": ["pytest"]},
    entry_points={"console_scripts": ["malt-fast=malt_fast.cli:main"]},
)
