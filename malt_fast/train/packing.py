"""Tree packing: a prompt and all the completions that branch from it in one sequence.

A question's DPO pairs share their prompt, and siblings share their parent's transcript. Packing
lays every segment (token span) of the tree out once, in one row, with an attention mask under
which each token sees its own segment's earlier tokens and its ancestors, never a sibling. Each
segment continues its parent's positions, so RoPE sees exactly what an unpacked sequence would.

A child's first token is predicted from its parent's last hidden state, which siblings share, so
targets are listed as (hidden position, token) pairs rather than shifted labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segment:
    tokens: list[int]
    parent: int = -1          # index of the parent segment; -1 for a root
    scored: bool = False      # whether this segment's tokens count in its sequence log-prob


@dataclass
class PackedTree:
    input_ids: torch.Tensor    # [T]
    positions: torch.Tensor    # [T] position of each token in its own unpacked sequence
    mask: torch.Tensor         # [T, T] bool, True = may attend
    hidden_index: torch.Tensor  # [M] position whose hidden state predicts target m
    targets: torch.Tensor      # [M] the predicted token ids
    owner: torch.Tensor        # [M] index of the scored segment target m belongs to
    scored: list[int]          # segment indices with scored=True, in `owner` numbering order


def pack_tree(segments: list[Segment]) -> PackedTree:
    """Lay out segments in order (a parent must come before its children)."""
    starts, ends, depth_pos, seg_of = [], [], [], []
    ids, pos = [], []
    for i, seg in enumerate(segments):
        if seg.parent >= i:
            raise ValueError(f"segment {i}: parent {seg.parent} must come earlier")
        if not seg.tokens:
            raise ValueError(f"segment {i} is empty")
        first = 0 if seg.parent < 0 else depth_pos[seg.parent] + len(segments[seg.parent].tokens)
        depth_pos.append(first)
        starts.append(len(ids))
        ids += seg.tokens
        pos += range(first, first + len(seg.tokens))
        seg_of += [i] * len(seg.tokens)
        ends.append(len(ids))

    n = len(segments)
    ancestor = torch.zeros(n, n, dtype=torch.bool)  # ancestor[i, j]: j is i or an ancestor of i
    for i, seg in enumerate(segments):
        ancestor[i, i] = True
        if seg.parent >= 0:
            ancestor[i] |= ancestor[seg.parent]
    seg_t = torch.tensor(seg_of)
    T = len(ids)
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    mask = ancestor[seg_t][:, seg_t] & causal

    hidden_index, targets, owner, scored = [], [], [], []
    for i, seg in enumerate(segments):
        if not seg.scored:
            continue
        if seg.parent < 0:
            raise ValueError(f"segment {i}: a scored segment needs a parent (its prompt)")
        k = len(scored)
        scored.append(i)
        prev = ends[seg.parent] - 1  # the parent's last token predicts this segment's first
        for t in range(len(seg.tokens)):
            hidden_index.append(prev if t == 0 else starts[i] + t - 1)
            targets.append(seg.tokens[t])
            owner.append(k)
    return PackedTree(torch.tensor(ids), torch.tensor(pos), mask, torch.tensor(hidden_index),
                      torch.tensor(targets), torch.tensor(owner), scored)


def sequence_logprobs(token_logprobs: torch.Tensor, packed: PackedTree) -> torch.Tensor:
    """Sum the per-target log-probs [M] into one log-prob per scored segment."""
    out = torch.zeros(len(packed.scored), dtype=token_logprobs.dtype, device=token_logprobs.device)
    return out.index_add(0, packed.owner.to(token_logprobs.device), token_logprobs)


def packed_token_logprobs(model, packed: PackedTree, logprob_fn=None) -> torch.Tensor:
    """Per-target log-probs [M] from one forward over the packed row.

    `logprob_fn(hidden [M, H], weight [V, H], targets [M]) -> [M]` defaults to a plain
    log-softmax; training passes the fused kernel so no [M, V] logits are kept.
    """
    device = model.embed_tokens.weight.device
    hidden = model.hidden_states(packed.input_ids[None].to(device), packed.positions[None].to(device),
                                 mask=packed.mask[None, None].to(device))[0]
    h = hidden[packed.hidden_index.to(device)]
    targets = packed.targets.to(device)
    if logprob_fn is not None:
        return logprob_fn(h, model.lm_head.weight, targets)
    logits = (h @ model.lm_head.weight.T).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
