"""Which dtype runs fastest here.

bf16 halves memory traffic, but on a CPU without native bf16 dot products (AVX512-BF16 or AMX)
PyTorch's bf16 matmul falls back to a slow path: on an AVX2-only AMD EPYC a [24 x 576] x
[576 x 1536] bf16 linear ran at ~2 GFLOP/s against ~15 for fp32 (2026-11-28), while on an
AVX512-BF16 Xeon bf16 ran 2-4x faster than fp32. So "auto" looks at the CPU flags.
"""

from __future__ import annotations

import functools

import torch

from malt_fast.errors import MaltError


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: trust PyTorch's own dispatch level
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 dot products, fp32 elsewhere."""
    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' -> fast_dtype(device); otherwise a torch dtype name ('float32', 'bfloat16')."""
    if name == "auto":
        return fast_dtype(device)
    return getattr(torch, name)


DTYPES = ("float32", "bfloat16", "float16", "auto")


def placement(dtype: str, device: str, source) -> tuple[torch.dtype, torch.device]:
    """A config's `dtype` and `device` fields as torch objects ('auto' device: CUDA when there
    is one; 'auto' dtype: fast_dtype there); a bad one is a one-line error naming `source` and
    the field."""
    if dtype not in DTYPES:
        raise MaltError(f"{source}: field 'dtype': expected one of {', '.join(DTYPES)}, "
                        f"got {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = None
    if isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            pass
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise MaltError(f"{source}: field 'device': expected auto, cpu, cuda or cuda:N, "
                        f"got {device!r}")
    return resolve_dtype(dtype, dev), dev
