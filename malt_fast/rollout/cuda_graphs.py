"""Decode steps with fixed shapes, replayed from CUDA graphs.

A decode step of a small model is hundreds of short kernels; launching them one by one from
Python costs more than running them. Here a step of B sequences runs as a step of `bucket` >= B
rows (the smallest bucket that fits) whose inputs sit in fixed buffers: token ids, positions,
block tables and the attention plan (`PagedKVCache.begin_static_decode`). On CUDA the first step
of each bucket is captured into a graph and later steps only refill the buffers and replay it.

Without capture (CPU) the same fixed-shape step runs eagerly, so its padding and buffers are
tested where no GPU is: it must give exactly the tokens of the ordinary decode step.

A graph holds the addresses of the weights it saw: weights changed in place are picked up,
weights replaced by new tensors are not (build a new Engine after swapping a model).
"""

from __future__ import annotations

import torch


def bucket_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of two up to 16, then steps of 16 (at most 15 padding rows)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, cache, max_batch: int, capture: bool):
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = bucket_sizes(max_batch)
        self.ids = torch.zeros(max_batch, 1, dtype=torch.int64, device=cache.k.device)
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, logits buffer)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def usable(self, seq_ids: list[int]) -> bool:
        return len(seq_ids) <= self.buckets[-1] and self.cache.fits_static(seq_ids)

    def logits(self, seq_ids: list[int], last_tokens: list[int]) -> torch.Tensor:
        """Next-token logits [B, V] after appending last_tokens[i] to seq_ids[i]."""
        B = len(seq_ids)
        bucket = next(b for b in self.buckets if b >= B)
        step = self.cache.begin_static_decode(seq_ids, bucket)
        ids = self.ids[:bucket]
        ids[B:] = 0
        ids[:B, 0].copy_(torch.tensor(last_tokens, dtype=torch.int64), non_blocking=True)
        if not self.capture:
            return self._forward(ids, step["positions"])[:B]
        if bucket not in self.graphs:
            self.graphs[bucket] = self._record(ids, step["positions"])
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:B]

    def _forward(self, ids, positions):
        h = self.model.hidden_states(ids, positions, cache=self.cache)
        return self.model.lm_head(h[:, -1])

    def _record(self, ids, positions):
        # warm up on a side stream (Triton compiles, cuBLAS picks kernels), then capture; the
        # step is idempotent (it rewrites the same keys and values), so running it again is safe
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(ids, positions)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(ids, positions)
        return graph, out
