"""Role selection and the joint schedule: interleaved steps, same weights as one role after another
(each role has its own optimizer and RNG stream), a role trained alone ends where it ends in a
multi-role run, and a joint run interrupted twice resumes to the same weights. fp32, CPU: exact."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_packing import random_llama

from malt_fast.errors import MaltError
from malt_fast.model import load_model, load_tokenizer, save_model
from malt_fast.train.trainer import TrainConfig, Trainer, job_config

QUESTIONS = [f"What is {a} times {b}?" for a, b in [(2, 3), (4, 4), (7, 1), (5, 6)]]


@pytest.fixture(scope="module")
def tok(smollm_gguf):
    return load_tokenizer(smollm_gguf)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny-schedule") / "model"
    save_model(random_llama(tok.vocab_size, 1, hidden=32, tie=True), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    for role in ("generator", "verifier"):
        with open(d / f"sft_{role}.jsonl", "w") as f:
            for i, q in enumerate(QUESTIONS):
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                    "completion": f"{role} says {i}."}) + "\n")
        with open(d / f"dpo_{role}.jsonl", "w") as f:
            for i, q in enumerate(QUESTIONS):
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                    "chosen": f"It is {i}.", "rejected": "No idea."}) + "\n")
    return d


def config(**kw):
    # dropout > 0, so each role draws random numbers and the RNG streams matter
    base = dict(roles=("generator", "verifier"), sft_epochs=2, dpo_epochs=2, batch_size=2,
                sft_lr=1e-2, dpo_lr=5e-3, save_every=2, tensorboard=False,
                lora={"rank": 4, "alpha": 8.0, "dropout": 0.1})
    return TrainConfig(**{**base, **kw})


def train(model_dir, tok, data, out, cfg, trainer_cls=Trainer):
    trainer_cls(load_model(model_dir), tok, data, out, cfg, log=lambda *_: None).run()
    ckpt = out / "checkpoints"
    adapters = {p.name: load_file(p / "adapter_model.safetensors") for p in ckpt.iterdir()}
    return adapters, [json.loads(line) for line in open(out / "metrics.jsonl")]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


STEP_KEYS = ("loss", "lr", "tokens", "rewards/margin")


def by_step(metrics):
    return {(m["role"], m["phase"], m["step"]): tuple(m.get(k) for k in STEP_KEYS)
            for m in metrics}


def test_joint_matches_sequential_and_single_role(model_dir, tok, data, tmp_path):
    seq_adapters, seq_metrics = train(model_dir, tok, data, tmp_path / "seq", config())
    joint_adapters, joint_metrics = train(model_dir, tok, data, tmp_path / "joint",
                                          config(schedule="joint"))
    assert set(seq_adapters) == set(joint_adapters) == {"generator", "verifier"}
    for role in seq_adapters:
        assert_same(seq_adapters[role], joint_adapters[role])
    assert by_step(seq_metrics) == by_step(joint_metrics)
    # sequential: all generator steps first; joint: one step per role in turn
    assert [m["role"] for m in seq_metrics[:4]] == ["generator"] * 4
    assert [m["role"] for m in joint_metrics[:4]] == ["generator", "verifier"] * 2
    # generator: SFT only by default; verifier: SFT then DPO
    assert {(m["role"], m["phase"]) for m in joint_metrics} == {
        ("generator", "sft"), ("verifier", "sft"), ("verifier", "dpo")}

    alone, alone_metrics = train(model_dir, tok, data, tmp_path / "alone",
                                 config(roles=("verifier",), schedule="joint"))
    assert set(alone) == {"verifier"}
    assert_same(alone["verifier"], seq_adapters["verifier"])
    assert {m["role"] for m in alone_metrics} == {"verifier"}


class Interrupt(Exception):
    pass


def interrupted_after(n):
    class Cut(Trainer):
        writes = 0

        def write_metrics(self, rec):
            super().write_metrics(rec)
            Cut.writes += 1
            if Cut.writes == n:  # like a kill: whatever came after the last checkpoint is lost
                raise Interrupt
    return Cut


def test_joint_resume_is_exact(model_dir, tok, data, tmp_path):
    cfg = config(schedule="joint")
    straight, straight_metrics = train(model_dir, tok, data, tmp_path / "straight", cfg)
    out = tmp_path / "cut"
    # cut at the 5th step (generator SFT step 3 of 4, checkpoints at 2 for both roles); resumed,
    # cut again at its 7th step: the generator is done, the verifier at DPO step 3 (checkpoint 2)
    for n in (5, 7):
        with pytest.raises(Interrupt):
            train(model_dir, tok, data, out, cfg, interrupted_after(n))
    assert (out / "state" / "generator-sft.done").exists()
    assert (out / "state" / "verifier-dpo.pt").exists()
    assert not (out / "state" / "verifier-dpo.done").exists()
    resumed, metrics = train(model_dir, tok, data, out, cfg)
    for role in straight:
        assert_same(straight[role], resumed[role])
    # repeated steps after a resume log the same values as the first time
    first = by_step(straight_metrics)
    for m in metrics:
        assert tuple(m.get(k) for k in STEP_KEYS) == first[(m["role"], m["phase"], m["step"])]


@pytest.mark.parametrize("field,value,message", [
    ("roles", ("generator", "critic"),
     r"field 'train\.roles\.1': expected generator, verifier, refiner or star, got 'critic'"),
    ("roles", (), r"field 'train\.roles': expected at least one role"),
    ("roles", ("verifier", "verifier"), r"field 'train\.roles': lists a role twice"),
    ("schedule", "parallel", r"field 'train\.schedule': expected sequential or joint"),
    ("packing", "flat", r"field 'train\.packing': expected tree or none, got 'flat'"),
    ("finetune", "qlora", r"field 'train\.finetune': expected lora or full"),
    ("batch_size", 0, r"field 'train\.batch_size': expected an integer >= 1, got 0"),
    ("dpo_lr", -1.0, r"field 'train\.dpo_lr': expected a number > 0"),
    ("generator_dpo", "yes", r"field 'train\.generator_dpo': expected true or false"),
    ("lora", {"rank": 0}, r"field 'train\.lora\.rank': expected an integer >= 1"),
    ("lora", {"rnak": 4}, r"unknown field 'train\.lora\.rnak' \(did you mean 'rank'\?\)"),
])
def test_bad_config_values(field, value, message):
    with pytest.raises(MaltError, match="^" + message):
        TrainConfig(**{field: value})
    with pytest.raises(MaltError, match=r"^runs/x\.yaml: " + message):
        job_config({"data": "d", "out": "o", "train": {field: value}}, "runs/x.yaml")


def test_config_from_a_job():
    with pytest.raises(MaltError, match=r"^c\.yaml: unknown field 'train\.epochs' \(did you "):
        job_config({"data": "d", "out": "o", "train": {"epochs": 3}}, "c.yaml")
    with pytest.raises(MaltError, match=r"^c\.yaml: field 'train': expected a mapping, got \[1\]$"):
        job_config({"data": "d", "out": "o", "train": [1]}, "c.yaml")
    with pytest.raises(MaltError, match=r"^c\.yaml: field 'out': missing$"):
        job_config({"data": "d"}, "c.yaml")
    cfg = job_config({"data": "d", "out": "o", "train": {"roles": ["refiner"], "schedule": "joint",
                                                         "packing": "none", "sft_lr": "5e-5"}},
                     "c.yaml").train
    assert cfg.roles == ("refiner",) and cfg.schedule == "joint" and cfg.packing == "none"
    assert cfg.sft_lr == 5e-5  # PyYAML reads 5e-5 as a string
    assert TrainConfig(roles="verifier").roles == ("verifier",)
