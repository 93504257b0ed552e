"""SFT / DPO-family losses against direct formulas, and the model -> token log-prob bridge."""

import math

import pytest
import torch

from malt_fast.model.llama import Llama, LlamaConfig
from malt_fast.train.losses import (IGNORE, completion_mask, dpo_loss, sequence_logprobs, sft_loss,
                                    token_logprobs)


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Llama(cfg).to(dtype)


# hand-made per-token log-probs: 2 sequences x 5 tokens, the first 2 (resp. 3) are prompt
LOGP = torch.tensor([[-9.0, -8.0, -0.5, -1.0, -2.0],
                     [-7.0, -6.0, -5.0, -0.25, -0.75]])
MASK = torch.tensor([[False, False, True, True, True],
                     [False, False, False, True, True]])


def test_sequence_logprob_and_sft_are_completion_only():
    assert sequence_logprobs(LOGP, MASK).tolist() == [-3.5, -1.0]
    loss, metrics = sft_loss(LOGP, MASK)
    assert loss.item() == pytest.approx((3.5 + 1.0) / 5)
    assert metrics["tokens"] == 5
    changed = LOGP.clone()
    changed[~MASK] = -1e4  # prompt tokens must not matter
    assert sft_loss(changed, MASK)[0].item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="no completion tokens"):
        sft_loss(LOGP, torch.zeros_like(MASK))


# policy chosen, policy rejected, reference chosen, reference rejected (3 pairs)
PC = torch.tensor([-10.0, -20.0, -5.0])
PR = torch.tensor([-12.0, -18.0, -9.0])
RC = torch.tensor([-11.0, -19.0, -6.0])
RR = torch.tensor([-11.5, -19.0, -7.0])


def direct(kind, beta):
    out = []
    for pc, pr, rc, rr in zip(PC.tolist(), PR.tolist(), RC.tolist(), RR.tolist()):
        h = (pc - rc) - (pr - rr)
        if kind == "sigmoid":
            out.append(math.log(1 + math.exp(-beta * h)))
        elif kind == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * h))
    return sum(out) / len(out)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.2, 0.7])
def test_dpo_family_matches_formula(kind, beta):
    pc = PC.clone().requires_grad_()
    loss, m = dpo_loss(pc, PR, RC, RR, beta=beta, kind=kind)
    assert loss.item() == pytest.approx(direct(kind, beta), rel=1e-6)
    chosen = [beta * (a - b) for a, b in zip(PC.tolist(), RC.tolist())]
    rejected = [beta * (a - b) for a, b in zip(PR.tolist(), RR.tolist())]
    assert m["rewards/chosen"] == pytest.approx(sum(chosen) / 3)
    assert m["rewards/rejected"] == pytest.approx(sum(rejected) / 3)
    assert m["rewards/margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 3)
    # pair 0: +0.2b vs -0.1b (right), pair 1: -0.2b vs +0.2b (wrong), pair 2: +0.2b vs -0.4b (right)
    assert m["rewards/accuracy"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(loss.item())
    loss.backward()
    if kind == "sigmoid":  # every pair pushes its chosen log-prob up
        assert (pc.grad < 0).all()


def test_dpo_default_beta_is_paper_value():
    assert dpo_loss(PC, PR, RC, RR)[0].item() == pytest.approx(direct("sigmoid", 0.2), rel=1e-6)


def test_dpo_bad_input():
    with pytest.raises(ValueError, match="unknown loss"):
        dpo_loss(PC, PR, RC, RR, kind="kto")
    with pytest.raises(ValueError, match="four"):
        dpo_loss(PC, PR[:2], RC, RR)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0)


def test_token_logprobs_match_eager_logits():
    model = tiny_model()
    ids = torch.randint(0, 61, (3, 11))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[2, 8:] = IGNORE  # padding
    got = token_logprobs(model, ids, labels)
    with torch.no_grad():
        ref = torch.log_softmax(model.double()(ids)[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
    ref = torch.where(labels[:, 1:] != IGNORE, ref, 0.0)
    assert got.shape == (3, 11) and (got[:, 0] == 0).all()
    torch.testing.assert_close(got[:, 1:].double(), ref, atol=1e-5, rtol=0)
    mask = completion_mask(labels)
    assert mask.sum().item() == 3 * 7 - 3
    with pytest.raises(ValueError, match="must both be"):
        token_logprobs(model, ids, labels[:, 1:])


def test_dpo_steps_move_chosen_up_and_rejected_down():
    model = tiny_model(seed=1)
    prompt = [5, 9, 14, 2, 33]
    chosen_ids = torch.tensor([prompt + [7, 8, 9, 10], prompt + [40, 41, 42, 43]])
    rejected_ids = torch.tensor([prompt + [20, 21, 22, 23], prompt + [50, 51, 52, 53]])

    def labels_of(ids):
        lab = ids.clone()
        lab[:, : len(prompt)] = IGNORE
        return lab

    def seq_logps():
        out = []
        for ids in (chosen_ids, rejected_ids):
            lab = labels_of(ids)
            out.append(sequence_logprobs(token_logprobs(model, ids, lab), completion_mask(lab)))
        return out

    with torch.no_grad():
        ref_c, ref_r = seq_logps()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for _ in range(4):
        pc, pr = seq_logps()
        loss, m = dpo_loss(pc, pr, ref_c, ref_r, beta=0.2)
        first = first if first is not None else m["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pc, pr = seq_logps()
    _, m = dpo_loss(pc, pr, ref_c, ref_r)
    assert (pc > ref_c).all(), "chosen log-probs should rise"
    assert (pr < ref_r).all(), "rejected log-probs should fall"
    assert m["loss"] < first and m["rewards/accuracy"] == 1.0
