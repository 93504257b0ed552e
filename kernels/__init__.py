"""GPU kernels (Triton), importable as malt_fast.kernels. Each file: kernel(s) + autograd.Function."""
