"""Three role engines under DeepSpeed ZeRO-3 on CPU/gloo, 2 ranks via torchrun on 127.0.0.1,
against single-process training without DeepSpeed on the same data and the same global batch.

Launch 1 (tests/train/ds_roles_worker.py): full fine-tuning of the verifier (SFT then DPO) under
ZeRO-3 with parameter and optimizer offload; then LoRA for all three roles, killed (os._exit) right
after verifier DPO step 3, whose checkpoint is from step 2. Launch 2 (`malt-fast train` through
torchrun) resumes the LoRA run and finishes it.

Same global batch: train.batch_size rows (DPO pairs) per micro-step over both ranks, as in the
single-process run. Checked, fp32 throughout (the shipped configs with bf16 off):
- every step's loss, DPO margin and learning rate equal the single-process run's (LoRA: the real
  `Trainer`, tree-packed; full: a plain torch loop, unpacked) within 1e-5 absolute or relative;
  measured differences are ~1e-7 (summation order across ranks);
- the step redone after the resume equals its first run, and finished phases are not retrained;
- final LoRA adapters (PEFT files) within 1e-5 (+1e-4 relative) of the single-process ones; final
  full-fine-tuning weights (HF format) within 1e-4 (measured 3e-5, see the assert).
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from malt_fast.errors import MaltError
from malt_fast.model import load_model, load_tokenizer, save_model
from malt_fast.config import DeepSpeedSection
from malt_fast.train.distributed import parse_spec, read_ds_config, resolve_ds_config
from malt_fast.train.losses import completion_mask, dpo_loss, sft_loss, token_logprobs
from test_train_packing import random_llama
from malt_fast.train.trainer import TrainConfig, Trainer, collate, joined

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ds_roles_worker.py")
ATOL = RTOL = 1e-5
TRAIN = {"roles": ["generator", "verifier", "refiner"], "sft_epochs": 1, "dpo_epochs": 2,
         "batch_size": 2, "grad_accum": 2, "save_every": 2, "sft_lr": 2e-2, "dpo_lr": 5e-3,
         "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0}, "tensorboard": False}
QUESTIONS = [f"What is {a} plus {b}?" for a, b in [(2, 3), (4, 4), (7, 1), (5, 6), (9, 2)]]


def write_sets(d: Path):
    # five rows with batch_size 2: every epoch ends in a one-row batch (one rank gets nothing),
    # and 3 micro-batches per epoch with grad_accum 2 end SFT (1 epoch) in a short optimizer step
    d.mkdir(parents=True, exist_ok=True)
    for role in TRAIN["roles"]:
        with open(d / f"sft_{role}.jsonl", "w") as f:
            for i, q in enumerate(QUESTIONS):
                f.write(json.dumps({"id": f"q{i}", "prompt": [{"role": "user", "content": q}],
                                    "completion": f"{role}: the answer is {i * 7}."}) + "\n")
        with open(d / f"dpo_{role}.jsonl", "w") as f:
            for i, q in enumerate(QUESTIONS):
                f.write(json.dumps({"id": f"q{i}", "prompt": [{"role": "user", "content": q}],
                                    "chosen": f"So it is {i}." * (1 + i % 2),
                                    "rejected": "I refuse."}) + "\n")


def ds_json(tmp, name, **changes):
    """A shipped config made fp32 (exact comparison) and sharding every tensor of the tiny model."""
    d = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
    d["bf16"]["enabled"] = False
    d["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    d.update(changes)
    path = tmp / f"ds-{name}"
    path.write_text(json.dumps(d))
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout):
    """Run torchrun with 2 ranks on 127.0.0.1; on timeout the whole process group (torchrun and
    its ranks, which would otherwise wait forever in a collective) is killed."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} did not finish within {timeout} s (the first "
                    f"DeepSpeed start on a machine compiles its shm op):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def metrics(path):
    return [json.loads(line) for line in open(path)]


def last_by_step(recs):
    return {(r["role"], r["phase"], r["step"]): r for r in recs}


def close(a, b):
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def assert_same_losses(got: dict, want: dict, keys=("loss",)):
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for k in sorted(want):
        for field in keys:
            if field in want[k]:
                assert close(got[k][field], want[k][field]), (k, field, got[k][field],
                                                              want[k][field])


def full_finetune_reference(model_dir, tok, data, cfg: TrainConfig, role):
    """Plain single-process full fine-tuning, unpacked rows: the Trainer's encoded rows and batch
    order, a torch AdamW and the losses module; nothing from DeepSpeed or train.distributed."""
    model = load_model(model_dir).train()
    helper = Trainer(model, tok, data, data / "unused", cfg)
    records = {}
    for phase in cfg.phases(role):
        pd = helper.phase_data(role, phase)
        epochs = cfg.sft_epochs if phase == "sft" else cfg.dpo_epochs
        batches = helper.batch_order(pd.groups, epochs, role, phase)
        lr = cfg.sft_lr if phase == "sft" else cfg.dpo_lr
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        total = math.ceil(len(batches) / cfg.grad_accum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))

        def seq_logps(seqs):
            ids, labels = collate([joined(s) for s in seqs], tok.pad_token_id)
            logp = token_logprobs(model, ids, labels)
            return logp, labels

        if phase == "dpo":
            with torch.no_grad():
                logp, labels = seq_logps([s for pair in pd.items for s in pair])
                ref = (logp * completion_mask(labels)).sum(-1).view(-1, 2)
        for step in range(total):
            opt.zero_grad()
            losses = []
            chunk = batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
            for idx in chunk:
                if phase == "sft":
                    logp, labels = seq_logps([pd.items[i] for i in idx])
                    loss, _ = sft_loss(logp, completion_mask(labels))
                else:
                    logp, labels = seq_logps([s for i in idx for s in pd.items[i]])
                    seq = (logp * completion_mask(labels)).sum(-1).view(-1, 2)
                    loss, _ = dpo_loss(seq[:, 0], seq[:, 1], ref[idx, 0], ref[idx, 1], cfg.beta)
                (loss / len(chunk)).backward()  # a mean over the step's micro-batches
                losses.append(loss.item())
            opt.step()
            sched.step()
            records[(role, phase, step + 1)] = {"loss": sum(losses) / len(losses)}
    return records, model


def test_three_role_engines_zero3_match_single_process(tmp_path, smollm_gguf):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")

    # the GGUF tokenizer as an HF directory beside the model: every process loads it in a
    # fraction of the time the GGUF parse takes, with the same ids
    gguf_tok = load_tokenizer(smollm_gguf)
    gguf_tok.hf.chat_template = gguf_tok.chat_template
    gguf_tok.hf.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": gguf_tok.eos_token_ids}))
    tok = load_tokenizer(tmp_path / "model")
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    assert tok.apply_chat_template(msgs) == gguf_tok.apply_chat_template(msgs)
    model = random_llama(tok.vocab_size, tie=True, std=0.05)
    save_model(model, tmp_path / "model")
    data = tmp_path / "data"
    write_sets(data)
    base = {"model": str(tmp_path / "model"), "data": str(data)}

    lora = dict(base, out=str(tmp_path / "ds-lora"), train=TRAIN,
                deepspeed=str(ds_json(tmp_path, "zero3.json")))
    full_train = dict(TRAIN, roles=["verifier"], packing="none", finetune="full")
    offload = ds_json(tmp_path, "zero3_offload.json", zero_force_ds_cpu_optimizer=False)
    # torch AdamW on the offloaded states: DeepSpeed's CPU Adam would be compiled first
    offload_cfg = json.loads(offload.read_text())
    del offload_cfg["optimizer"]
    offload.write_text(json.dumps(offload_cfg))
    full = dict(base, out=str(tmp_path / "ds-full"), train=full_train,
                deepspeed=str(offload))
    paths = {}
    killed_cfg = dict(lora, interrupt_at=["verifier", "dpo", 3])
    for name, cfg in [("full", full), ("lora-killed", killed_cfg), ("lora", lora)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(cfg))  # JSON is YAML for `malt-fast train`

    first = torchrun([str(WORKER), str(paths["full"]), str(paths["lora-killed"])], timeout=240)
    assert first.returncode != 0 and "INTERRUPTED rank 0" in first.stdout, \
        first.stdout[-3000:] + first.stderr[-5000:]
    killed = metrics(tmp_path / "ds-lora" / "metrics.jsonl")
    second = torchrun(["-m", "malt_fast.cli", "train", str(paths["lora"])], timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    resumed = metrics(tmp_path / "ds-lora" / "metrics.jsonl")[len(killed):]

    # single-process references; one thread: the tiny model gains nothing from two, and on a
    # busy machine a descheduled OpenMP thread stalls every op for its time slice
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_against_references(tmp_path, tok, data, killed, resumed, full_train)
    finally:
        torch.set_num_threads(threads)


def check_against_references(tmp_path, tok, data, killed, resumed, full_train):
    from safetensors.torch import load_file

    ref_cfg = TrainConfig(**TRAIN)
    Trainer(load_model(tmp_path / "model"), tok, data, tmp_path / "ref-lora", ref_cfg,
            log=lambda *_: None).run()
    want = last_by_step(metrics(tmp_path / "ref-lora" / "metrics.jsonl"))

    # LoRA: losses, margins, the redone step, no retraining of finished phases, final adapters
    got = last_by_step(killed + resumed)
    # (not rewards/accuracy: at DPO step 1 every margin is 0 up to rounding, its sign is noise)
    assert_same_losses(got, want, ("loss", "rewards/margin", "lr"))
    assert killed[-1]["role"] == "verifier" and killed[-1]["phase"] == "dpo" \
        and killed[-1]["step"] == 3
    assert (resumed[0]["role"], resumed[0]["phase"], resumed[0]["step"]) == ("verifier", "dpo", 3)
    assert close(resumed[0]["loss"], killed[-1]["loss"])
    assert len(killed) + len(resumed) == len(want) + 1
    assert all(r["world_size"] == 2 for r in killed + resumed)
    for role in TRAIN["roles"]:
        a = load_file(tmp_path / "ds-lora" / "checkpoints" / role / "adapter_model.safetensors")
        b = load_file(tmp_path / "ref-lora" / "checkpoints" / role / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=f"{role} {k}")

    # full fine-tuning with offload: losses and the final HF-format weights
    ref_records, ref_model = full_finetune_reference(tmp_path / "model", tok, data,
                                                     TrainConfig(**full_train), "verifier")
    assert_same_losses(last_by_step(metrics(tmp_path / "ds-full" / "metrics.jsonl")), ref_records)
    trained = load_model(tmp_path / "ds-full" / "checkpoints" / "verifier").state_dict()
    for k, v in ref_model.state_dict().items():
        # Adam sizes each element's step by its gradient's sign more than its size, so an element
        # whose gradient is near zero turns rounding into up to a step of lr (2e-2): measured 3e-5
        torch.testing.assert_close(trained[k], v, atol=1e-4, rtol=1e-4, msg=k)


# ---------------------------------------------------------------- configs (no processes started)


def test_shipped_configs_resolve_from_the_train_section():
    cfg = TrainConfig(batch_size=4, grad_accum=3, sft_lr=1e-4, weight_decay=0.01)
    for name in ("zero3.json", "zero3_offload.json"):
        path = ROOT / "configs" / "deepspeed" / name
        d = resolve_ds_config(read_ds_config(path), path, cfg, world=2, cuda=False)
        assert d["zero_optimization"]["stage"] == 3 and d["bf16"]["enabled"] is True
        assert (d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"],
                d["train_batch_size"]) == (2, 3, 12)
        assert d["gradient_clipping"] == 0.0 and "activation_checkpointing" in d
    zero = d["zero_optimization"]
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    assert d["optimizer"]["params"] == {"lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.999],
                                        "eps": 1e-8}
    auto = resolve_ds_config({"bf16": {"enabled": "auto"}}, "x.json", cfg, world=4, cuda=False)
    assert auto["bf16"]["enabled"] is False and auto["train_micro_batch_size_per_gpu"] == 1


@pytest.mark.parametrize("change, problem", [
    ({"zero_optimization": {"stage": 5}}, "stage must be 0, 1, 2 or 3"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4 but"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove 'scheduler'"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
     "offload_optimizer needs an 'optimizer' section"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}},
     "zero_optimization.reduce_bucket_size is \"auto\""),
    ({"activation_checkpointing": {"partition_activations": True}}, "needs model parallelism"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "pick one"),
    ({"bf16": True}, "'bf16' must be a JSON object"),
])
def test_bad_deepspeed_config_names_the_file(tmp_path, change, problem):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(change))
    with pytest.raises(MaltError) as e:
        resolve_ds_config(read_ds_config(path), path, TrainConfig(batch_size=2, grad_accum=2),
                          world=2, cuda=False)
    assert str(e.value).startswith(f"{path}: ") and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_config_and_spec_errors(tmp_path):
    for text, problem in [("{", "invalid JSON"),
                          ("[1]", "a DeepSpeed config must be a JSON object")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(MaltError, match=f"^{tmp_path / 'bad.json'}: {problem}"):
            read_ds_config(tmp_path / "bad.json")
    with pytest.raises(MaltError, match="no such DeepSpeed config file"):
        read_ds_config(tmp_path / "missing.json")
    with pytest.raises(MaltError, match="smaller than the 4 ranks"):
        resolve_ds_config({}, "x.json", TrainConfig(batch_size=2), world=4, cuda=False)
    assert parse_spec("a.json", "run.yaml") == DeepSpeedSection(config=Path("a.json"), nproc=1)
    assert parse_spec({"config": "a.json", "nproc": 8}, "run.yaml") == \
        DeepSpeedSection(config=Path("a.json"), nproc=8)
    for entry, problem in [({"config": "a.json", "finetune": "full"},
                            "unknown field 'deepspeed.finetune'"),
                           ({"config": "a.json", "stage": 3}, "unknown field 'deepspeed.stage'"),
                           ({"config": "a.json", "nproc": 0},
                            "field 'deepspeed.nproc': expected an integer >= 1"),
                           ({"finetune": "full"}, "field 'deepspeed.config': missing"),
                           (5, "field 'deepspeed': expected a mapping")]:
        with pytest.raises(MaltError, match=f"^run.yaml: .*{problem}"):
            parse_spec(entry, "run.yaml")


def test_cli_train_with_a_missing_deepspeed_config_fails_in_one_line(tmp_path, capsys):
    from malt_fast.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"data": str(tmp_path), "out": str(tmp_path / "out"),
                               "deepspeed": str(tmp_path / "nope.json")}))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"malt-fast: error: {tmp_path / 'nope.json'}: no such DeepSpeed config file"
