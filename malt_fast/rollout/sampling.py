"""Next-token sampling for a batch of rows that each carry their own settings and random stream.

A row's draw depends only on its logits and its own generator, never on which other rows share
the batch, so a seed names the same samples however the engine schedules the work.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Zero the probabilities outside each row's top-k and top-p (nucleus) sets; probs [B, V]."""
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k, probs.shape[-1]).clamp(max=probs.shape[-1])
        kth = probs.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        probs = torch.where(probs >= kth, probs, 0.0)
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        keep_sorted = before < top_p[:, None] * sorted_p.sum(-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams],
           streams: list[BranchRandom]) -> torch.Tensor:
    """One token per row of logits [B, V] (any float dtype); returns int64 [B] on the CPU."""
    logits = logits.float()
    greedy = [p.greedy for p in params]
    if all(greedy):
        return logits.argmax(-1).cpu()
    dev = logits.device
    rows = [i for i, g in enumerate(greedy) if not g]
    sub = [params[i] for i in rows]
    rows_t = torch.tensor(rows, device=dev)
    temp = torch.tensor([p.temperature for p in sub], device=dev)
    picked_logits = logits if len(rows) == len(params) else logits[rows_t]
    probs = torch.softmax(picked_logits / temp[:, None], dim=-1)
    if any(p.top_k > 0 or p.top_p < 1 for p in sub):  # decided on the host: no device sync
        probs = filter_probs(probs, torch.tensor([p.top_p for p in sub], device=dev),
                             torch.tensor([p.top_k for p in sub], device=dev))
    # inverse-CDF draw: one uniform per row from that row's own generator
    u = torch.tensor([streams[i].uniform() for i in rows], dtype=torch.float32)
    cdf = probs.cumsum(-1)
    target = (u.to(dev) * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    out = logits.argmax(-1) if len(rows) < len(params) \
        else torch.empty(len(params), dtype=torch.int64, device=dev)
    out[rows_t] = picked[:, 0]
    return out.cpu()
