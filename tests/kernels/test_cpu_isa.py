"""The C++ kernels' every vector path against the fp64 references: the extension is built for the
x86-64 baseline and picks AVX-512 / AVX2 / plain loops at run time; MALT_FAST_ISA caps the pick,
so this machine runs each path its CPU has (the default path is what the other tests run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = ["tests/rollout/test_decode_attention.py", "tests/kernels/test_linear_logprob.py"]


def chosen(isa: str | None) -> str:
    env = dict(os.environ)
    env.pop("MALT_FAST_ISA", None)
    if isa:
        env["MALT_FAST_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", "import torch, malt_fast._C as c; "
                          "print(c.cpu_isa())"], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_the_cap_is_obeyed():
    widest = chosen(None)
    assert widest in ("avx512", "avx2", "plain")
    assert chosen("plain") == "plain"
    assert chosen("avx2") == ("plain" if widest == "plain" else "avx2")


@pytest.mark.parametrize("isa", ["plain", "avx2"])
def test_kernels_on_a_capped_path(isa):
    if isa == "avx2" and chosen(None) == "plain":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, MALT_FAST_ISA=isa)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *KERNEL_TESTS, "-k", "not cuda"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout
