"""Config errors of `malt-fast train` and `malt-fast run`: one line naming the config file and the
field, exit status 2, before any model is loaded."""

import json

import pytest

from malt_fast.cli import main

BAD_TRAIN = [
    ({"sft_lr": -1}, "field 'train.sft_lr': expected a number > 0, got -1"),
    ({"finetune": "qlora"}, "field 'train.finetune': expected lora or full, got 'qlora'"),
    ({"epochs": 2}, "unknown field 'train.epochs' (did you mean 'sft_epochs'?)"),
]


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("train, message", BAD_TRAIN)
def test_bad_train_field_names_the_file_and_field(tmp_path, capsys, command, train, message):
    cfg = tmp_path / "job.yaml"
    fields = {"data": str(tmp_path), "out": str(tmp_path / "out")} if command == "train" else {}
    cfg.write_text(json.dumps({**fields, "train": train}))
    assert main([command, str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"malt-fast: error: {cfg}: {message}")
    assert "\n" not in err


@pytest.mark.parametrize("job, message", [
    ({"out": "o"}, "field 'data': missing"),
    ({"data": "d", "out": "o", "epochs": 1}, "unknown field 'epochs' (known: model, "),
    ({"data": "d", "out": "o", "device": "gpu"}, "field 'device': expected auto, cpu, cuda or cuda:N"),
    ({"data": "d", "out": "o", "dtype": "fp8"}, "field 'dtype': expected float32, bfloat16, "),
    ({"data": "d", "out": "o", "train": [1]}, "field 'train': expected a mapping, got [1]"),
    ({"data": "d", "out": "o", "init": "no/such/dir"}, "field 'init': no such directory"),
    # checked before DeepSpeed is imported or a process group started
    ({"data": "d", "out": "o", "deepspeed": "ds.json", "train": {"lora": {"rnak": 2}}},
     "unknown field 'train.lora.rnak' (did you mean 'rank'?)"),
    ({"data": "d", "out": "o", "deepspeed": {"config": "ds.json", "finetune": "full"}},
     "unknown field 'deepspeed.finetune' (known: config, nproc)"),
])
def test_bad_train_job_names_the_file(tmp_path, capsys, job, message):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps(job))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"malt-fast: error: {cfg}: {message}") and "\n" not in err


@pytest.mark.parametrize("run, message", [
    ({"deepspeed": {"config": "nope.json"}}, "nope.json: no such DeepSpeed config file"),
    ({"deepspeed": {"config": "DS", "nproc": 3}, "train": {"batch_size": 2}},
     "DS: train.batch_size 2 is smaller than the 3 ranks"),
    ({"deepspeed": {"config": "DS", "nproc": "all"}}, "RUN: field 'deepspeed.nproc'"),
    ({"deepspeed": {"config": "DS", "gpus": 2}}, "RUN: unknown field 'deepspeed.gpus'"),
    ({"device": "tpu"}, "RUN: field 'device': expected auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_run_deepspeed_entry(tmp_path, capsys, run, message):
    """`malt-fast run` checks its deepspeed: entry and JSON when it starts, not after the
    expansion: a run must not find a typo hours in."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = tmp_path / "run.yaml"
    text = json.dumps(run).replace('"DS"', json.dumps(str(ds)))
    text = text.replace('"nope.json"', json.dumps(str(tmp_path / "nope.json")))
    cfg.write_text(text)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    want = message.replace("RUN", str(cfg)).replace("DS", str(ds)).replace(
        "nope.json", str(tmp_path / "nope.json"))
    assert err.startswith(f"malt-fast: error: {want}") and "\n" not in err
