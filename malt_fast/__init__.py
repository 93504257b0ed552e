"""malt-fast: multi-agent LLM training (generator, verifier, refiner) with fast rollout and
fused log-prob kernels."""

from malt_fast.errors import MaltError

__version__ = "0.1.0"
__all__ = ["MaltError", "__version__"]
