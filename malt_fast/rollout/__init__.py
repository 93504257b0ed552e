"""Rollout: paged KV cache with shared prefixes, batched sampling engine, G→V→R tree expansion."""

from malt_fast.rollout.engine import Completion, Engine, Request
from malt_fast.rollout.paged_cache import CacheFull, PagedKVCache
from malt_fast.rollout.sampling import SamplingParams
from malt_fast.rollout.tree import LevelSampling, RoleLayout, expand_generations, expand_tree

__all__ = ["Engine", "Request", "Completion", "PagedKVCache", "CacheFull", "SamplingParams",
           "RoleLayout", "LevelSampling", "expand_tree",
           "expand_generations"]
