"""Single-process full fine-tuning (`train.finetune: full`): every role trains its own copy of the
base, SFT then DPO, as with LoRA. Checked against a plain torch loop (tests/train/
test_deepspeed_roles.py's reference: the Trainer's rows and batch order, torch AdamW, unpacked
rows); the HF export loads in transformers with our trained model's logits; the base is left as
it was and a sequential run holds one role copy at a time. A non-finite loss keeps the last good
state (LoRA and full share that path)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_deepspeed_roles import full_finetune_reference
from test_trainer import model_dir, tok  # noqa: F401  (fixtures: the tiny tied Llama)
from test_trainer import QUESTIONS, nll, write_sets

from malt_fast.errors import MaltError
from malt_fast.model import load_model
from malt_fast.train.trainer import TrainConfig, Trainer

ROLES = ("generator", "verifier", "refiner")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()  # tiny model: a second thread only waits on the first
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Keep(Trainer):
    """Keeps each role's trained model as it is exported, and how many role copies were alive at
    every optimizer step."""

    def finish_role(self, role):
        self.trained = getattr(self, "trained", {})
        self.trained[role] = copy.deepcopy(self.policy(role))
        return super().finish_role(role)

    def write_metrics(self, rec):
        self.alive = getattr(self, "alive", []) + [len(self.role_models)]
        super().write_metrics(rec)


def test_full_finetune_sft_dpo_export(model_dir, tok, tmp_path, one_thread):
    from transformers import LlamaForCausalLM

    write_sets(tmp_path / "data")
    base = load_model(model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = TrainConfig(finetune="full", sft_epochs=4, dpo_epochs=2, batch_size=3, sft_lr=2e-3,
                      dpo_lr=1e-3, save_every=1000, tensorboard=False)
    trainer = Keep(base, tok, tmp_path / "data", tmp_path / "out", cfg, log=lambda *_: None)
    out = trainer.run()
    assert set(out) == set(ROLES)

    # the base is only copied, never trained; a sequential run holds one role copy at a time
    # (made when the role starts, released once exported)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert max(trainer.alive) == 1 and trainer.role_models == {}
    assert all(p.requires_grad is False or p.grad is None for p in base.parameters())

    sft_rows = [(q, f"The answer is {i}.") for i, q in enumerate(QUESTIONS)]
    for role in ROLES:
        ckpt = tmp_path / "out" / "checkpoints" / role
        assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
        before_nll = nll(base, tok, sft_rows, None)
        assert nll(trainer.trained[role], tok, sft_rows, None) < before_nll - 0.5, role
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert {(m["role"], m["phase"]) for m in metrics} == {
        ("generator", "sft"), ("verifier", "sft"), ("verifier", "dpo"), ("refiner", "sft"),
        ("refiner", "dpo")}
    dpo = [m for m in metrics if m["role"] == "verifier" and m["phase"] == "dpo"]
    assert dpo[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)  # starts at the reference
    assert dpo[-1]["rewards/margin"] > dpo[0]["rewards/margin"] + 0.1

    # transformers loads the export and computes our trained model's logits (fp32: 1e-5)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": QUESTIONS[1]}])])
    for role in ROLES:
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "checkpoints" / role).eval()
        with torch.no_grad():
            ours = trainer.trained[role](ids)
            assert (hf(ids).logits - ours).abs().max().item() <= 1e-5, role
            assert (ours - base(ids)).abs().max().item() > 1e-3, role  # it was trained

    # the same training as a plain torch loop over the trainer's rows and batch order (unpacked,
    # torch AdamW): per-step losses 1e-5, weights 1e-4 (Adam turns rounding in near-zero
    # gradients into up to a step of lr; as in the DeepSpeed test)
    ref_records, ref_model = full_finetune_reference(model_dir, tok, tmp_path / "data", cfg,
                                                     "verifier")
    got = {(m["role"], m["phase"], m["step"]): m for m in metrics}
    for key, rec in ref_records.items():
        assert got[key]["loss"] == pytest.approx(rec["loss"], rel=1e-5, abs=1e-5), key
    trained = load_file(tmp_path / "out" / "checkpoints" / "verifier" / "model.safetensors")
    for k, v in ref_model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to the embeddings, saved once
        torch.testing.assert_close(trained[f"model.{k}"], v, atol=1e-4, rtol=1e-4, msg=k)


def test_rerun_and_init_from(model_dir, tok, tmp_path, one_thread):
    """A finished run rerun is not retrained and exports the same weights; `init_from` starts a
    role from an earlier export (iterative rounds) and a role without one from the base."""
    write_sets(tmp_path / "data", roles=("verifier", "refiner"))
    cfg = TrainConfig(roles=("verifier",), finetune="full", sft_epochs=1, dpo_epochs=1,
                      batch_size=6, sft_lr=1e-2, save_every=1000, tensorboard=False)
    out = tmp_path / "out"
    Trainer(load_model(model_dir), tok, tmp_path / "data", out, cfg, log=lambda *_: None).run()
    first = load_file(out / "checkpoints" / "verifier" / "model.safetensors")
    steps = len(open(out / "metrics.jsonl").readlines())
    Trainer(load_model(model_dir), tok, tmp_path / "data", out, cfg, log=lambda *_: None).run()
    assert len(open(out / "metrics.jsonl").readlines()) == steps
    again = load_file(out / "checkpoints" / "verifier" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)

    class Starts(Trainer):
        def start_model(self, role):
            model = super().start_model(role)
            self.starts = {**getattr(self, "starts", {}), role: copy.deepcopy(model)}
            return model

    cfg2 = TrainConfig(roles=("verifier", "refiner"), finetune="full", sft_epochs=1,
                       dpo_epochs=1, batch_size=6, save_every=1000, tensorboard=False)
    base = load_model(model_dir)
    t = Starts(base, tok, tmp_path / "data", tmp_path / "round2", cfg2, log=lambda *_: None,
               init_from=out / "checkpoints")
    t.run()
    verifier = t.starts["verifier"].state_dict()
    assert all(torch.equal(verifier[f"{k[len('model.'):]}"], v) for k, v in first.items())
    refiner = t.starts["refiner"].state_dict()
    assert all(torch.equal(refiner[k], v) for k, v in base.state_dict().items())


# ---------------------------------------------------------------- non-finite loss


def lora_config(**kw):
    # dropout > 0 and two micro-batches per step: the saved RNG state and the dropped partial
    # gradient both matter for an exact resume
    return TrainConfig(**{**dict(roles=("verifier",), sft_epochs=1, dpo_epochs=2, batch_size=1,
                                 grad_accum=2, sft_lr=1e-2, dpo_lr=5e-3, tensorboard=False,
                                 lora={"rank": 4, "alpha": 8.0, "dropout": 0.1}), **kw})


def blows_up(phase, at_call=None, nan_after_step=None):
    """A Trainer whose `phase` goes non-finite: its loss at the `at_call`-th micro-batch, or its
    weights right after optimizer step `nan_after_step`."""
    class Bad(Trainer):
        calls = 0

        def loss(self, model, ph, *args):
            loss, *rest = super().loss(model, ph, *args)
            if ph == phase:
                Bad.calls += 1
                if Bad.calls == at_call:
                    loss = loss * float("inf")
            return (loss, *rest)

        def finish_step(self, bar, device, metrics, t0, t_phase, **fields):
            rec = super().finish_step(bar, device, metrics, t0, t_phase, **fields)
            if fields["phase"] == phase and fields["step"] == nan_after_step:
                with torch.no_grad():
                    self.trained_parameters(fields["role"])[-1].fill_(float("nan"))
            return rec
    return Bad


def test_non_finite_loss_keeps_the_last_good_state(model_dir, tok, tmp_path, one_thread):
    write_sets(tmp_path / "data", roles=("verifier",))
    data, quiet = tmp_path / "data", (lambda *_: None)
    straight = tmp_path / "straight"
    Trainer(load_model(model_dir), tok, data, straight, lora_config(save_every=1000),
            log=quiet).run()

    # the second micro-batch of DPO step 3 is infinite; no periodic checkpoint exists (save_every
    # 1000), so the state before step 3 is saved when the run stops
    out = tmp_path / "cut"
    cfg = lora_config(save_every=1000)
    with pytest.raises(MaltError) as e:
        blows_up("dpo", at_call=6)(load_model(model_dir), tok, data, out, cfg, log=quiet).run()
    state = out / "state" / "verifier-dpo.pt"
    assert str(e.value) == (f"verifier dpo: non-finite loss (inf) at step 3/6; the last good "
                            f"checkpoint is {state} (step 2)")
    blob = torch.load(state, weights_only=False)
    assert blob["step"] == 2 and all(torch.isfinite(p).all() for p in blob["params"])
    assert sorted(p.name for p in (out / "state").iterdir()) == [
        "verifier-dpo.pt", "verifier-sft.done", "verifier-sft.pt"]  # no temp file, no .done
    assert not (out / "checkpoints").exists()
    dpo_steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")
                 if '"dpo"' in line]
    assert dpo_steps == [1, 2]
    # it was the state before the bad step, optimizer and RNG included: resumed, the run ends
    # where the uninterrupted one ends, bit for bit
    Trainer(load_model(model_dir), tok, data, out, cfg, log=quiet).run()
    a = load_file(straight / "checkpoints" / "verifier" / "adapter_model.safetensors")
    b = load_file(out / "checkpoints" / "verifier" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # weights gone non-finite in step 3's update: step 4's loss is NaN, that state is not saved,
    # and the message names the periodic checkpoint of step 2 (still on disk, finite)
    out = tmp_path / "nan"
    with pytest.raises(MaltError) as e:
        blows_up("dpo", nan_after_step=3)(load_model(model_dir), tok, data, out,
                                          lora_config(save_every=2), log=quiet).run()
    assert str(e.value) == (f"verifier dpo: the weights went non-finite by step 3; the last "
                            f"good checkpoint is {out / 'state' / 'verifier-dpo.pt'} (step 2)")
    assert "\n" not in str(e.value)
    blob = torch.load(out / "state" / "verifier-dpo.pt", weights_only=False)
    assert blob["step"] == 2 and all(torch.isfinite(p).all() for p in blob["params"])
