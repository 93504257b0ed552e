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


def step_token_ids(sampled: torch.Tensor, row_ints: torch.Tensor, rows: int) -> torch.Tensor:
    """A decode step's input tokens [rows, 1]: row i takes the previous step's sample at row
    row_ints[0, i], or the token row_ints[1, i] when that is -1 (given by the host). The
    previous samples never visit the host on their way back in."""
    src, given = row_ints[0, :rows], row_ints[1, :rows]
    return torch.where(src >= 0, sampled[src.clamp(min=0)], given)[:, None]


class DecodeGraphs:
    """Fixed-shape decode steps whose token ids come from `step_token_ids(sampled, row_ints)`:
    both tensors are read in place, so a replay picks up whatever the engine wrote there."""

    def __init__(self, model, cache, max_batch: int, capture: bool, sampled: torch.Tensor,
                 row_ints: torch.Tensor):
        self.model, self.cache, self.capture = model, cache, capture
        self.sampled, self.row_ints = sampled, row_ints
        self.buckets = bucket_sizes(max_batch)
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, logits buffer)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def usable(self, seq_ids: list[int]) -> bool:
        return len(seq_ids) <= self.buckets[-1] and self.cache.fits_static(seq_ids)

    def logits(self, seq_ids: list[int]) -> torch.Tensor:
        """Next-token logits [B, V] after appending each row's input token to seq_ids[i]."""
        B = len(seq_ids)
        bucket = next(b for b in self.buckets if b >= B)
        positions = self.cache.begin_static_decode(seq_ids, bucket)["positions"]
        if not self.capture:
            return self._forward(bucket, positions)[:B]
        if bucket not in self.graphs:
            self.graphs[bucket] = self._record(bucket, positions)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:B]

    def _forward(self, bucket: int, positions: torch.Tensor):
        ids = step_token_ids(self.sampled, self.row_ints, bucket)
        h = self.model.hidden_states(ids, positions, cache=self.cache)
        return self.model.lm_head(h[:, -1])

    def _record(self, bucket: int, positions: torch.Tensor):
        # warm up on a side stream (Triton compiles, cuBLAS picks kernels), then capture; the
        # step is idempotent (it rewrites the same keys and values), so running it again is safe
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(bucket, positions)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(bucket, positions)
        return graph, out
