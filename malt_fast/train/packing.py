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


# ---------------------------------------------------------------- training batches


@dataclass
class PackedBatch:
    """Sequences that share a prompt packed into one row per distinct prompt.

    Built from (prompt_ids, completion_ids) sequences: each distinct prompt is laid out once and
    each distinct completion of it once, as a child of the prompt. `seq_segment[s]` says which
    packed completion sequence s is (-1: an empty completion, whose log-prob is 0).
    """
    input_ids: torch.Tensor    # [R, T] (padding: token 0)
    positions: torch.Tensor    # [R, T]
    mask: torch.Tensor         # [R, 1, T, T] bool; a padding token sees only itself
    hidden_row: torch.Tensor   # [M] row and column of the hidden state that predicts target m
    hidden_col: torch.Tensor   # [M]
    targets: torch.Tensor      # [M]
    owner: torch.Tensor        # [M] packed completion (0..n_completions-1) target m belongs to
    seq_segment: torch.Tensor  # [S]
    n_completions: int
    unpacked_tokens: int       # sum of len(prompt) + len(completion) over the S sequences
    packed_tokens: int         # real (non-padding) tokens in the rows


def pack_sequences(seqs: list[tuple[list[int], list[int]]]) -> PackedBatch:
    """Pack (prompt_ids, completion_ids) sequences: rows in order of first appearance of their
    prompt, completions in order of first appearance within it, identical ones laid out once."""
    trees: dict[tuple, dict[tuple, int]] = {}  # prompt -> {completion -> index within the tree}
    where = []
    for s, (prompt, completion) in enumerate(seqs):
        if not prompt:
            raise ValueError(f"sequence {s}: empty prompt (its first token would have no context)")
        children = trees.setdefault(tuple(prompt), {})
        if not completion:
            where.append(None)
            continue
        where.append((tuple(prompt), children.setdefault(tuple(completion), len(children))))

    packs, offset, first = [], 0, {}
    for prompt, children in trees.items():
        first[prompt] = offset
        if not children:  # every sequence of this prompt is empty: nothing to run
            continue
        segs = [Segment(list(prompt))] + [Segment(list(c), 0, True) for c in children]
        packs.append(pack_tree(segs))
        offset += len(children)
    # pack_tree numbers the scored segments in layout order: owner k is child k of the prompt
    seq_segment = torch.tensor([-1 if w is None else first[w[0]] + w[1] for w in where],
                               dtype=torch.long)
    R, T = max(len(packs), 1), max((p.input_ids.numel() for p in packs), default=1)
    ids = torch.zeros(R, T, dtype=torch.long)
    pos = torch.zeros(R, T, dtype=torch.long)
    mask = torch.eye(T, dtype=torch.bool).repeat(R, 1, 1)  # an all-False row would give NaN
    rows, cols, targets, owner, base = [], [], [], [], 0
    for r, p in enumerate(packs):
        n = p.input_ids.numel()
        ids[r, :n], pos[r, :n], mask[r, :n, :n] = p.input_ids, p.positions, p.mask
        rows.append(torch.full_like(p.hidden_index, r))
        cols.append(p.hidden_index)
        targets.append(p.targets)
        owner.append(p.owner + base)
        base += len(p.scored)
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))
    return PackedBatch(ids, pos, mask[:, None], cat(rows), cat(cols), cat(targets), cat(owner),
                       seq_segment, base, sum(len(p) + len(c) for p, c in seqs),
                       sum(p.input_ids.numel() for p in packs))


def batch_sequence_logprobs(model, batch: PackedBatch, backend=None, logprob_fn=None):
    """Sequence log-probs [S] (fp32) of a PackedBatch: one forward over its rows.

    `logprob_fn(hidden [M, H], weight [V, H], targets [M]) -> [M]` replaces the fused kernel
    (benchmarks pass an eager log-softmax); by default lm_head goes through `head_logprobs`, which
    also handles a ZeRO-3-sharded head.
    """
    from malt_fast.train.losses import IGNORE, head_logprobs

    device = model.embed_tokens.weight.device
    if batch.targets.numel() == 0:
        return torch.zeros(batch.seq_segment.numel(), device=device)
    hidden = model.hidden_states(batch.input_ids.to(device), batch.positions.to(device),
                                 mask=batch.mask.to(device))
    h = hidden[batch.hidden_row.to(device), batch.hidden_col.to(device)]
    targets = batch.targets.to(device)
    if logprob_fn is not None:
        logp = logprob_fn(h, model.lm_head.weight, targets)
    else:
        logp = head_logprobs(model.lm_head, h, targets, IGNORE, backend)
    per = torch.zeros(batch.n_completions, dtype=torch.float32, device=device)
    per = per.index_add(0, batch.owner.to(device), logp.float())
    seg = batch.seq_segment.to(device)
    return torch.where(seg >= 0, per[seg.clamp(min=0)], 0.0)
