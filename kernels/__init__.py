"""GPU kernels (Triton), importable as malt_fast.kernels. Each file: kernel(s) + autograd.Function.

Public entry point: `linear_logprobs(hidden, weight, targets, ignore_index=-100, backend=None)`.
"""

from malt_fast.kernels.dispatch import BACKENDS, linear_logprobs

__all__ = ["BACKENDS", "linear_logprobs"]
