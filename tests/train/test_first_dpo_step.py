"""At the first DPO step the policy is the role's SFT state and so is the reference: the loss must
be ln 2 and every reward 0, in every dtype, packing mode, batch size, fine-tuning mode and
schedule. In bf16 and fp16 this holds only if the reference is computed in the policy's own batch
layout (a GEMM's rounding depends on the batch), which is what these tests pin down; before the
reference followed the policy's batches, bf16 runs started 0.02 nats off ln 2.

The model is the packaged SmolLM2-135M cut to its first 4 layers: real weights, whose large
activations make layout rounding show (with it, the old unpacked reference started these jobs
0.003-0.03 nats off ln 2 in bf16; tiny random models hide it, their log-probs are too flat). The
data is a MALT-shaped DPO set: prompts with three or four completions of different lengths, every
positive x negative pair, more pairs than one batch.
"""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from malt_fast.model import load_model, load_tokenizer
from malt_fast.train.trainer import TrainConfig, Trainer, policy_logprobs

LN2 = math.log(2)
WORDS = "the sum is seven so we carry one and add four more to get eleven then twelve".split()


@pytest.fixture(scope="module")
def tok(smollm_gguf):
    return load_tokenizer(smollm_gguf)


@pytest.fixture(scope="module")
def smollm_4_layers(smollm_gguf):
    model = load_model(smollm_gguf, dtype=torch.bfloat16)
    model.layers = model.layers[:4]
    model.config = dataclasses.replace(model.config, num_hidden_layers=4)
    return model


@pytest.fixture
def make_model(smollm_4_layers):
    return lambda dtype: copy.deepcopy(smollm_4_layers).to(dtype)


def text(rng, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))


def write_sets(d, roles=("verifier",), prompts=8, seed=0):
    """Per prompt 3-4 completions (lengths 4-23 words), the first one or two positive: SFT rows
    on the positives, DPO pairs positive x negative (2 to 4 pairs per prompt)."""
    rng = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    for role in roles:
        sft, dpo = [], []
        for q in range(prompts):
            prompt = [{"role": "system", "content": "Check the solution."},
                      {"role": "user", "content": f"Question {q}: {text(rng, 12 + 3 * q)}"}]
            comps = [text(rng, int(torch.randint(4, 24, (1,), generator=rng)))
                     for _ in range(3 + q % 2)]
            pos = 1 + q % 2
            sft += [{"id": f"{q}/{i}", "prompt": prompt, "completion": c}
                    for i, c in enumerate(comps[:pos])]
            dpo += [{"id": f"{q}/{i}>{j}", "prompt": prompt, "chosen": comps[i],
                     "rejected": comps[j]} for i in range(pos) for j in range(pos, len(comps))]
        for name, rows in ((f"sft_{role}.jsonl", sft), (f"dpo_{role}.jsonl", dpo)):
            (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(dpo)


def first_dpo_steps(out):
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["role"]: r for r in recs if r["phase"] == "dpo" and r["step"] == 1}


def assert_starts_at_ln2(rec, what):
    # 1e-3 is the bound; the computation is the same one twice, so the measured
    # difference is exactly 0
    assert abs(rec["loss"] - LN2) < 1e-3, (what, rec["loss"])
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert abs(rec[k]) < 1e-3, (what, k, rec[k])


def run(tmp_path, tok, model, roles=("verifier",), **train):
    """Train on the fewest prompts that give more pairs than one optimizer step takes."""
    data = tmp_path / "data"
    step = train.get("batch_size", 4) * train.get("grad_accum", 1)
    prompts = next(p for p in range(1, 20) if 3 * p - p % 2 > step)  # 2, 4, 2, 4, ... pairs
    pairs = write_sets(data, roles, prompts)
    cfg = TrainConfig(roles=roles, tensorboard=False, sft_lr=1e-2, dpo_lr=1e-3,
                      lora={"rank": 4, "alpha": 8.0}, **train)
    Trainer(model, tok, data, tmp_path / "out", cfg, log=lambda *_: None).run()
    return first_dpo_steps(tmp_path / "out"), pairs


@pytest.mark.parametrize("dtype, packing, finetune, batch_size", [
    (torch.bfloat16, "tree", "lora", 4),
    (torch.bfloat16, "none", "lora", 4),
    (torch.bfloat16, "tree", "full", 16),
    (torch.bfloat16, "none", "full", 3),
    (torch.bfloat16, "tree", "lora", 1),
    (torch.float16, "tree", "lora", 3),
    (torch.float32, "none", "lora", 4),
])
def test_first_dpo_step_is_ln2(tmp_path, tok, make_model, dtype, packing, finetune, batch_size):
    first, pairs = run(tmp_path, tok, make_model(dtype), packing=packing, finetune=finetune,
                       batch_size=batch_size)
    assert pairs > batch_size  # the reference covers more than one micro-batch
    assert_starts_at_ln2(first["verifier"], (dtype, packing, finetune, batch_size))


def test_first_dpo_step_is_ln2_under_the_joint_schedule_with_grad_accum(tmp_path, tok,
                                                                       make_model):
    roles = ("verifier", "refiner")
    first, _ = run(tmp_path, tok, make_model(torch.bfloat16), roles=roles, schedule="joint", batch_size=3,
                   grad_accum=2)
    for role in roles:
        assert_starts_at_ln2(first[role], role)


def test_reference_is_the_policy_forward_per_sequence(tmp_path, tok, make_model):
    """Per sequence, not just on average: the cached reference equals the policy's training
    forward (train mode, gradients on) on each first-epoch micro-batch, bit for bit, in bf16;
    the reference of a different layout (all pairs in one unpacked batch) does not."""
    data = tmp_path / "data"
    write_sets(data)
    model = make_model(torch.bfloat16)
    cfg = TrainConfig(roles=("verifier",), tensorboard=False, batch_size=4, sft_epochs=0)
    trainer = Trainer(model, tok, data, tmp_path / "out", cfg, log=lambda *_: None)
    trainer.prepare()
    pd = trainer.phase_data("verifier", "dpo")
    batches = trainer.batch_order(pd.groups, 2, "verifier", "dpo")
    ref = trainer.reference("verifier", pd, batches)
    policy = trainer.policy("verifier").train()
    for idx in trainer.first_epoch(pd, batches):
        seqs = [s for i in idx for s in pd.items[i]]
        got, _ = policy_logprobs(policy, seqs, "tree")
        assert got.requires_grad
        assert torch.equal(got.detach().view(-1, 2), ref[idx]), idx
    with torch.no_grad():
        other, _ = policy_logprobs(policy, [s for pair in pd.items for s in pair], "none")
    assert (other.view(-1, 2) - ref).abs().max() > 1e-2  # the layout matters in bf16


def test_first_dpo_step_is_ln2_under_deepspeed(tmp_path, tok, smollm_4_layers, smollm_gguf):
    """Two ranks on gloo, ZeRO-3: bf16 (the shipped config, activation checkpointing on) with
    tree packing and LoRA, then fp32 unpacked. Each rank's reference is its own share of each
    first-epoch micro-batch, scored by the engine it trains with."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from malt_fast.model import save_model
    from test_deepspeed_roles import WORKER, ds_json, metrics, torchrun

    model_dir = tmp_path / "model"
    gguf_tok = load_tokenizer(smollm_gguf)  # an HF tokenizer directory loads fast in each rank
    gguf_tok.hf.chat_template = gguf_tok.chat_template
    gguf_tok.hf.save_pretrained(model_dir)
    save_model(smollm_4_layers, model_dir)
    data = tmp_path / "data"
    write_sets(data, prompts=4)
    jobs = []
    for name, dtype, packing in (("bf16", "bfloat16", "tree"), ("fp32", "float32", "none")):
        ds = ds_json(tmp_path, "zero3.json") if dtype == "float32" else \
            Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"
        job = {"model": str(model_dir), "dtype": dtype, "data": str(data),
               "out": str(tmp_path / name), "deepspeed": str(ds),
               "train": {"roles": ["verifier"], "packing": packing, "batch_size": 4,
                         "sft_lr": 1e-2, "dpo_lr": 1e-3, "lora": {"rank": 4, "alpha": 8.0},
                         "tensorboard": False}}
        jobs.append(tmp_path / f"{name}.json")
        jobs[-1].write_text(json.dumps(job))
    done = torchrun([str(WORKER), *map(str, jobs)], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for name in ("bf16", "fp32"):
        first = {r["role"]: r for r in metrics(tmp_path / name / "metrics.jsonl")
                 if r["phase"] == "dpo" and r["step"] == 1}
        assert first["verifier"]["world_size"] == 2
        assert_starts_at_ln2(first["verifier"], name)
