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


def branch_generator(seed: int, *path: int) -> torch.Generator:
    """A CPU generator for one branch, seeded from the call's seed and the branch's tree path."""
    h = seed & 0xFFFFFFFFFFFF
    for p in path:  # a simple mixing of the path so that sibling branches differ
        h = (h * 1_000_003 + p + 1) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)


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
           generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of logits [B, V] (any float dtype); returns int64 [B]."""
    logits = logits.float()
    greedy = torch.tensor([p.greedy for p in params])
    out = logits.argmax(-1).cpu()
    if bool(greedy.all()):
        return out
    rows = (~greedy).nonzero().flatten()
    sub = [params[i] for i in rows.tolist()]
    temp = torch.tensor([p.temperature for p in sub], device=logits.device)
    probs = torch.softmax(logits[rows.to(logits.device)] / temp[:, None], dim=-1)
    probs = filter_probs(probs, torch.tensor([p.top_p for p in sub], device=logits.device),
                         torch.tensor([p.top_k for p in sub], device=logits.device))
    # inverse-CDF draw: one uniform per row from that row's own generator
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows.tolist()])
    cdf = probs.cumsum(-1)
    target = (u.to(logits.device) * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    out[rows] = picked[:, 0].cpu()
    return out
