"""Next-token sampling for a batch of rows that each carry their own settings and random stream.

A row's draw depends only on its logits and its own generator, never on which other rows share
the batch, so a seed names the same samples however the engine schedules the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class BranchRandom:
    """One branch's uniforms: the values successive `torch.rand((), generator=g)` calls give,
    drawn 64 at a time (a batch of 256 branches costs one Python call per branch per step, not
    one torch call)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self._buffer: list[float] = []

    def uniform(self) -> float:
        if not self._buffer:
            self._buffer = torch.rand(64, generator=self.generator).tolist()[::-1]
        return self._buffer.pop()


def branch_generator(seed: int, *path: int) -> BranchRandom:
    """The random stream of one branch, seeded from the call's seed and the branch's tree path."""
    h = seed & 0xFFFFFFFFFFFF
    for p in path:  # a simple mixing of the path so that sibling branches differ
        h = (h * 1_000_003 + p + 1) & 0xFFFFFFFFFFFF
    return BranchRandom(torch.Generator().manual_seed(h))


def filter_probs(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k and top-p (nucleus) sets; probs [B, V].

    top_k 0 and top_p 1 keep a row whole; both filters run on every row, so no device sync
    decides which rows need them."""
    V = probs.shape[-1]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    kth = probs.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    probs = torch.where(probs >= kth, probs, 0.0)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    keep_sorted = (before < top_p[:, None] * sorted_p.sum(-1, keepdim=True)) | (top_p[:, None] >= 1)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return torch.where(keep, probs, 0.0)


def row_inputs(params: list[SamplingParams], streams: list[BranchRandom], floats: np.ndarray,
               top_k: np.ndarray) -> str:
    """Write one step's per-row inputs into host arrays: floats [3, >=B] (temperature, uniform,
    top_p) and top_k [>=B]; returns the step's mode for `sample_rows`.

    Greedy rows draw no uniform, so a branch's stream advances only when it samples."""
    B = len(params)
    greedy = [p.greedy for p in params]
    if all(greedy):
        return "greedy"
    floats[0, :B] = [p.temperature for p in params]
    floats[1, :B] = [0.0 if g else s.uniform() for g, s in zip(greedy, streams)]
    if not any(p.top_k > 0 or p.top_p < 1 for p in params):  # decided on the host: no sync
        return "sample"
    floats[2, :B] = [p.top_p for p in params]
    top_k[:B] = [p.top_k for p in params]
    return "filter"


def sample_rows(logits: torch.Tensor, floats: torch.Tensor, top_k: torch.Tensor,
                mode: str) -> torch.Tensor:
    """One token per row of logits [B, V] (any float dtype) from `row_inputs`' arrays on the
    logits' device; returns int64 [B] on that device, without a device sync."""
    logits = logits.float()
    best = logits.argmax(-1)
    if mode == "greedy":
        return best
    B = logits.shape[0]
    temp, u = floats[0, :B], floats[1, :B]
    probs = torch.softmax(logits / torch.where(temp > 0, temp, 1.0)[:, None], dim=-1)
    if mode == "filter":
        probs = filter_probs(probs, floats[2, :B], top_k[:B])
    # inverse-CDF draw: one uniform per row from that row's own generator
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return torch.where(temp > 0, picked.clamp(max=probs.shape[-1] - 1), best)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           streams: list[BranchRandom]) -> torch.Tensor:
    """`sample_rows` with inputs built here (a pageable copy: for occasional calls)."""
    B = len(params)
    floats, top_k = np.zeros((3, B), np.float32), np.zeros(B, np.int64)
    mode = row_inputs(params, streams, floats, top_k)
    dev = logits.device
    return sample_rows(logits, torch.from_numpy(floats).to(dev), torch.from_numpy(top_k).to(dev),
                       mode)
