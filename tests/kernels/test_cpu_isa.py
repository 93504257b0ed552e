"""The C++ kernels' every vector path against the fp64 references: the extension is built for the
x86-64 baseline and picks AVX-512 / AVX2 / plain loops at run time; MALT_FAST_ISA caps the pick,
so this machine runs each path its CPU has (the default path is what the other tests run).
MALT_FAST_ISA=avx512 keeps the AVX-512 row ops and turns the head's AVX512-BF16 GEMMs off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = ["tests/rollout/test_decode_attention.py", "tests/kernels/test_linear_logprob.py",
                "tests/kernels/test_linear_logprob_bf16.py"]


def chosen(isa: str | None, what: str = "cpu_isa") -> str:
    env = dict(os.environ)
    env.pop("MALT_FAST_ISA", None)
    if isa:
        env["MALT_FAST_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", "import torch, malt_fast._C as c; "
                          f"print(c.{what}())"], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_the_cap_is_obeyed():
    widest = chosen(None)
    assert widest in ("avx512", "avx2", "plain")
    assert chosen("plain") == "plain"
    assert chosen("avx2") == ("plain" if widest == "plain" else "avx2")
    assert chosen("avx512") == widest
    # the bf16 GEMMs need AVX-512 and go with any cap
    bf16 = chosen(None, "cpu_bf16_gemm") == "True"
    assert not bf16 or widest == "avx512"
    for cap in ("plain", "avx2", "avx512"):
        assert chosen(cap, "cpu_bf16_gemm") == "False"


@pytest.mark.parametrize("isa", ["plain", "avx2", "avx512"])
def test_kernels_on_a_capped_path(isa):
    if isa == "avx2" and chosen(None) == "plain":
        pytest.skip("this CPU has no AVX2")
    if isa == "avx512" and chosen(None, "cpu_bf16_gemm") != "True":
        pytest.skip("without AVX512-BF16 the avx512 cap is the default path")
    env = dict(os.environ, MALT_FAST_ISA=isa)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *KERNEL_TESTS, "-k", "not cuda"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout
