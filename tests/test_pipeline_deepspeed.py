"""`malt-fast run` with a `deepspeed:` entry: the train stage runs as 2 processes under torchrun
(gloo, CPU), expand / credit / evaluate in the run's own process, which evaluates with the roles
the ranks trained; a rerun skips the finished stage. The one test here that starts DeepSpeed
(~40 s on 2 cores; a machine's first DeepSpeed start also compiles its shm op)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import malt_fast.pipeline.train as train_stage
from malt_fast.model import load_model, load_tokenizer
from malt_fast.config import train_config
from malt_fast.pipeline import run_pipeline
from malt_fast.train.trainer import Trainer
from test_pipeline import fast_tokenizer  # noqa: F401  (a fixture)
from test_pipeline import ROLES
from test_pipeline_finetune import config, same, spy
from test_rounds import assets, torch_threads  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_run_trains_under_torchrun(assets, fast_tokenizer, tmp_path, monkeypatch,
                                   torch_threads):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    ds = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    ds["bf16"]["enabled"] = False  # fp32 on CPU, comparable with single-process training
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every tensor
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                "")]))
    lora = {"rank": 2, "alpha": 4.0}
    cfg = config(assets, fast_tokenizer, tmp_path / "run", {"batch_size": 2, "lora": lora},
                 deepspeed={"config": str(tmp_path / "ds.json"), "nproc": 2},
                 engine={"max_batch": 16, "cache_tokens": 4096, "merge_adapters": False})
    seen = spy(monkeypatch)
    launches = []
    real_run = subprocess.run

    def launch(cmd, **kwargs):
        launches.append(cmd)
        return real_run(cmd, timeout=300, **kwargs)

    monkeypatch.setattr(train_stage.subprocess, "run", launch)
    results = run_pipeline(cfg, log=lambda *a: None)

    run = tmp_path / "run"
    [cmd] = launches
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[-2:] == [
        "train", str(run / "train" / "deepspeed-job.yaml")]
    steps = [json.loads(line) for line in open(run / "train" / "metrics.jsonl")]
    assert steps and all(s["world_size"] == 2 for s in steps)
    assert {s["role"] for s in steps} == set(ROLES)
    saved = {r: load_file(run / "train" / "checkpoints" / r / "adapter_model.safetensors")
             for r in ROLES}
    # evaluated with the adapters the ranks trained, one per role
    [engines] = seen["evaluate"]
    for role in ROLES:
        adapter, weights = engines[role]
        assert adapter == role and same(weights, saved[role]), role
        assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0
                   for k, v in weights.items()), role
    assert {"MALT", "MALT+MV@3"} <= set(results["methods"])

    # the generated job carried the run's train section (seed included): single-process
    # training on the same data ends at the same adapters (fp32; sums over 2 ranks: 1e-5)
    torch.set_num_threads(1)
    Trainer(load_model(assets[0]), load_tokenizer(fast_tokenizer), run / "data", tmp_path / "ref",
            train_config(cfg), log=lambda *a: None).run()
    for role in ROLES:
        ref = load_file(tmp_path / "ref" / "checkpoints" / role / "adapter_model.safetensors")
        for k in ref:
            torch.testing.assert_close(saved[role][k], ref[k], atol=1e-5, rtol=1e-4)

    # rerun: every stage complete, torchrun not launched again, same results
    seen["evaluate"].clear()
    assert run_pipeline(cfg, log=lambda *a: None) == results
    assert len(launches) == 1 and seen["evaluate"] == []
