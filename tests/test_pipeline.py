"""`malt-fast run` end to end on a tiny random model with the packaged tokenizer, and resume."""

import json
import subprocess
import sys

import pytest
import torch

from malt_fast.model import save_model
from malt_fast.model.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True, eos_token_id=2))
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, path)
    return path


def write_config(path, model, tokenizer, run_dir):
    cfg = {"model": str(model), "tokenizer": str(tokenizer), "run_dir": str(run_dir),
           "dataset": "arith", "train_questions": 3, "n": 2, "chunk_questions": 2,
           "sampling": {"temperature": 1.0, "max_new_tokens": 6},
           "engine": {"max_batch": 16, "cache_tokens": 4096},
           "train": {"batch_size": 2, "lora": {"rank": 2, "alpha": 4.0}},
           "evaluate": {"seeds": [0, 1], "questions": 2, "chains": 3}}
    path.write_text(json.dumps(cfg))
    return path


def malt(*args):
    return subprocess.run([sys.executable, "-m", "malt_fast.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_run_end_to_end_and_rerun_skips(tiny_model, smollm_gguf, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, smollm_gguf, tmp_path / "run")
    proc = malt("run", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    trees = [json.loads(line) for line in open(run / "trees.jsonl")]
    assert len(trees) == 3 and len({t["id"] for t in trees}) == 3
    for t in trees:  # n=2 at every level: 2, 4, 8 nodes
        assert len(t["generations"]) == 2
        assert all(len(g["verifications"]) == 2 for g in t["generations"])
        assert all(len(v["refinements"]) == 2 for g in t["generations"] for v in g["verifications"])
    for role in ("generator", "verifier", "refiner"):
        assert (run / "data" / f"sft_{role}.jsonl").is_file()
        assert (run / "train" / "checkpoints" / role / "adapter_config.json").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())
    for m in ("SA", "SA+MV@3", "MA", "MA+MV@3", "MALT", "MALT+MV@3"):
        r = results["methods"][m]
        assert len(r["per_seed"]) == 2 and 0.0 <= r["mean"] <= 1.0 and r["std"] >= 0.0
    report = (run / "eval" / "report.md").read_text()
    assert "| MALT+MV@3 |" in report and " ± " in report
    assert (run / "eval" / "plots" / "accuracy.png").stat().st_size > 1000
    assert "MA+MV@3" in proc.stdout and "report:" in proc.stdout

    again = malt("run", cfg)  # everything complete: every stage is skipped, results unchanged
    assert again.returncode == 0, again.stderr[-2000:]
    assert "expand:" in again.stdout and "skipped" in again.stdout
    assert json.loads((run / "eval" / "results.json").read_text()) == results


def test_expand_resumes_after_a_lost_tree(tiny_model, smollm_gguf, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, smollm_gguf, tmp_path / "run")
    assert malt("expand", cfg).returncode == 0
    path = tmp_path / "run" / "trees.jsonl"
    full = path.read_text().splitlines()
    path.write_text("\n".join(full[:1]) + "\n" + full[1][: len(full[1]) // 2])  # killed mid-write
    proc = malt("expand", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = path.read_text().splitlines()
    assert sorted(resumed) == sorted(full)  # same trees, none twice, none lost


def test_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: arith\nbogus: 1\n")
    proc = malt("run", bad)
    assert proc.returncode == 2 and "bad.yaml: unknown field 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
