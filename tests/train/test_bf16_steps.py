"""One SFT step and one DPO step of the Trainer's loss path in bf16 against the same step in fp32,
on every device this machine has (CPU always, where bf16 inputs take the C++ head's own bf16
GEMMs when the CPU has AVX512-BF16; CUDA when present, where the head is the compiled Triton
kernel), with tree packing and without: the loss agrees within bf16 rounding and the gradient of
every trained parameter points the same way (cosine > 0.999, relative error < 5%).

Gradients, not the loss after an optimizer step: AdamW's first step is close to lr * sign(grad),
so the ~1% of tiny gradient entries whose sign bf16 rounding flips make post-step losses differ by
more than the step's own bf16 error (measured: DPO step 2 of a 4-layer SmolLM2 moves 0.022 from
ln 2 in fp32, 0.033-0.066 in bf16, depending on the head's GEMMs, while the gradients agree to
cosine 0.99982 either way).

Same model as test_first_dpo_step.py (SmolLM2-135M cut to 4 layers, real weights), cast once to
each dtype from the same bf16 weights; LoRA B is set to the same small random values in both, so
A's gradients are not zero.
"""

import pytest
import torch

from malt_fast.train.losses import dpo_loss
from malt_fast.train.trainer import TrainConfig, Trainer, policy_logprobs
from test_first_dpo_step import LN2, make_model, smollm_4_layers, tok, write_sets  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def grads_of_one_step(tmp_path, tok, model, phase, packing):
    write_sets(tmp_path / "data", prompts=4)
    cfg = TrainConfig(roles=("verifier",), tensorboard=False, packing=packing,
                      lora={"rank": 4, "alpha": 8.0})
    trainer = Trainer(model, tok, tmp_path / "data", tmp_path / "out", cfg, log=lambda *_: None)
    trainer.prepare()
    policy = trainer.policy("verifier").train()
    gen = torch.Generator().manual_seed(0)
    trained = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    for n, p in trained:
        if "lora_B" in n:
            p.data.copy_(0.01 * torch.randn(p.shape, generator=gen))
    items = trainer.phase_data("verifier", phase).items
    if phase == "sft":
        logp, _ = policy_logprobs(policy, items, packing)
        tokens = sum(len(c) for _, c in items)
        loss = -logp.sum() / tokens  # the SFT loss: mean NLL over the completion tokens
    else:
        logp, _ = policy_logprobs(policy, [s for pair in items for s in pair], packing)
        pairs = logp.view(-1, 2)
        ref = pairs.detach()
        loss, _ = dpo_loss(pairs[:, 0], pairs[:, 1], ref[:, 0], ref[:, 1])
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten().cpu() for _, p in trained])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packing", ["tree", "none"])
@pytest.mark.parametrize("phase", ["sft", "dpo"])
def test_bf16_step_matches_fp32(tmp_path, tok, make_model, device, packing, phase):
    loss, grad = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        loss[dtype], grad[dtype] = grads_of_one_step(tmp_path / str(dtype), tok,
                                                     make_model(dtype).to(device), phase, packing)
    a, b = grad[torch.float32], grad[torch.bfloat16]
    assert a.norm() > 0 and torch.isfinite(b).all()
    cos = torch.nn.functional.cosine_similarity(a, b, 0).item()
    rel = ((a - b).norm() / a.norm()).item()
    assert cos > 0.999 and rel < 0.05, (cos, rel)  # measured on CPU: 0.99982, 0.019
    if phase == "dpo":  # reference = the policy itself: exactly ln 2 in both dtypes
        assert loss[torch.float32] == pytest.approx(LN2, abs=1e-6)
        assert loss[torch.bfloat16] == pytest.approx(LN2, abs=1e-6)
    else:  # a mean NLL of ~17 nats here; bf16 logits move it by ~1e-2
        assert loss[torch.bfloat16] == pytest.approx(loss[torch.float32], rel=2e-3)


def test_a_wrong_gradient_fails_the_check():
    """The bounds above are not vacuous: a gradient with one parameter group's sign flipped,
    or scaled by 1.1, falls outside them."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10_000, generator=gen)
    flipped = a.clone()
    flipped[:100] *= -1
    for b in (flipped, 1.1 * a):
        cos = torch.nn.functional.cosine_similarity(a, b, 0).item()
        rel = ((a - b).norm() / a.norm()).item()
        assert not (cos > 0.999 and rel < 0.05)
