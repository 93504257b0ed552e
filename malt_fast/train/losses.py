"""SFT and DPO-family losses over per-token log-probs, and the model -> log-prob bridge.

Conventions: `labels` [B, T] are aligned with `input_ids` and hold the token id on completion tokens
and `IGNORE` (-100) on prompt and padding tokens. `token_logprobs` returns [B, T] log-probs aligned
with `labels` (position t holds log p(labels[t] | tokens < t), 0 where ignored), so a sequence's
log-prob is simply `.sum(-1)`. The fused kernel computes them without materialising logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from malt_fast.kernels import linear_logprobs

IGNORE = -100
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


# ---------------------------------------------------------------- model -> token log-probs


def head_logprobs(lm_head: torch.nn.Module, hidden, targets, ignore_index=IGNORE, backend=None):
    """linear_logprobs against `lm_head.weight`, also when ZeRO-3 has sharded it.

    Under ZeRO-3 the weight is an empty shard outside its module's forward, and its gradient must
    arrive while the module's hooks have it gathered. So the kernel runs *as* lm_head's forward:
    DeepSpeed's module hooks gather the weight for the forward and again before this output's
    backward, exactly as for a normal Linear call. Outside an engine (no hooks, e.g. reference
    log-probs of a zero.Init model) the weight is gathered explicitly with GatheredParameters.
    """
    weight = lm_head.weight
    if not hasattr(weight, "ds_id"):
        return linear_logprobs(hidden, weight, targets, ignore_index, backend)

    def fused(h):
        gather = contextlib.nullcontext()
        if weight.ds_status.name == "NOT_AVAILABLE":
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
        with gather:
            return linear_logprobs(h, weight, targets, ignore_index, backend)

    lm_head.forward = fused  # an instance attribute shadows Linear.forward for this one call
    try:
        return lm_head(hidden)
    finally:
        del lm_head.forward


def eager_logprobs(hidden, weight, targets, ignore_index=IGNORE):
    """The textbook head: [N, V] logits, fp32 log-softmax, gather; 0 where ignored. The baseline
    the fused kernel is benchmarked against (it materialises every logit)."""
    logp = (hidden @ weight.t()).float().log_softmax(-1)
    keep = targets != ignore_index
    out = logp.gather(-1, torch.where(keep, targets, 0)[:, None])[:, 0]
    return torch.where(keep, out, 0.0)


def token_logprobs(model, input_ids, labels, positions=None, mask=None, backend=None,
                   logprob_fn=None):
    """Per-token log-probs [B, T] (fp32) of `labels` under `model`; 0 on IGNORE labels.

    `model` is a malt_fast Llama (anything with `hidden_states(...)` and `lm_head`). `positions` and
    `mask` pass through to `hidden_states` (packed trees use an ancestor mask). Position 0 has no
    prediction and is always 0. `logprob_fn(hidden, weight, targets)` replaces the fused kernel
    (e.g. `eager_logprobs`, for benchmarks); it must give 0 on IGNORE targets.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"token_logprobs: input_ids {tuple(input_ids.shape)} and labels "
                         f"{tuple(labels.shape)} must both be [B, T]")
    B, T = input_ids.shape
    hidden = model.hidden_states(input_ids, positions, mask=mask)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)

    def head(h, y):
        if logprob_fn is not None:
            return logprob_fn(h, model.lm_head.weight, y).float()
        return head_logprobs(model.lm_head, h, y, IGNORE, backend)

    keep = (y != IGNORE).nonzero().squeeze(1)
    if 0 < keep.numel() < y.numel():
        # the head costs N x V: prompt and padding positions would be computed and thrown away
        part = head(h.index_select(0, keep), y.index_select(0, keep))
        logp = part.new_zeros(y.numel()).index_copy(0, keep, part)
    else:
        logp = head(h, y)
    return F.pad(logp.view(B, T - 1), (1, 0))


def completion_mask(labels):
    """True on completion tokens that have a prediction (labels != IGNORE, t >= 1)."""
    m = labels != IGNORE
    m[..., 0] = False
    return m


# ---------------------------------------------------------------- losses


def sequence_logprobs(token_logp, mask):
    """Sum of log-probs over completion tokens: [B, T], [B, T] bool -> [B]."""
    if token_logp.shape != mask.shape:
        raise ValueError(f"sequence_logprobs: log-probs {tuple(token_logp.shape)} and mask "
                         f"{tuple(mask.shape)} differ in shape")
    return torch.where(mask, token_logp, 0.0).sum(-1)


def sft_loss(token_logp, mask):
    """Mean negative log-likelihood over the batch's completion tokens; returns (loss, metrics).

    Token-weighted (every completion token counts once), so long answers are not down-weighted.
    """
    n = mask.sum()
    if int(n) == 0:
        raise ValueError("sft_loss: the batch has no completion tokens")
    loss = -sequence_logprobs(token_logp, mask).sum() / n
    return loss, {"loss": loss.item(), "tokens": int(n)}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.2, kind="sigmoid"):
    """DPO-family loss on sequence log-probs [B] each; returns (mean loss, metrics dict of floats).

    With h = (pi_c - ref_c) - (pi_r - ref_r):
      sigmoid (DPO):  -log sigmoid(beta * h)
      ipo:            (h - 1 / (2 beta))^2
      hinge (SLiC):   max(0, 1 - beta * h)
    Rewards are beta * (pi - ref); accuracy is the fraction with chosen reward > rejected reward.
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"dpo_loss: unknown loss {kind!r} (one of {DPO_LOSSES})")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss: expected four [B] tensors, got shapes {sorted(shapes)}")
    ref_chosen = ref_chosen.to(policy_chosen)
    ref_rejected = ref_rejected.to(policy_rejected)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    loss = losses.mean()
    with torch.no_grad():
        chosen_r = beta * chosen_ratio
        rejected_r = beta * rejected_ratio
        metrics = {
            "loss": loss.item(),
            "rewards/chosen": chosen_r.mean().item(),
            "rewards/rejected": rejected_r.mean().item(),
            "rewards/margin": (chosen_r - rejected_r).mean().item(),
            "rewards/accuracy": (chosen_r > rejected_r).float().mean().item(),
            "logps/chosen": policy_chosen.mean().item(),
            "logps/rejected": policy_rejected.mean().item(),
        }
    return loss, metrics
