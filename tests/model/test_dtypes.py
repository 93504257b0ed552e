import torch

from malt_fast.model import dtypes


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    assert dtypes.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    assert dtypes.resolve_dtype("auto") == torch.float32
    assert dtypes.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert dtypes.resolve_dtype("float32") == torch.float32
    assert dtypes.resolve_dtype("bfloat16") == torch.bfloat16


def test_flags_read_from_proc_cpuinfo():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert dtypes.cpu_has_native_bf16() == expected
