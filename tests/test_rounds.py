"""Iterative MALT (`rounds: k`): per-round data with the scheduled thresholds, round r + 1
expanding with round r's adapters, the rounds table and plot, resume, and bad schedules."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import malt_fast.malt.expand as expand_mod
from malt_fast.errors import MaltError
from malt_fast.model.lora import adapter_state_dict
from malt_fast.config import round_thetas
from malt_fast.pipeline import resolve, run_pipeline
from malt_fast.rollout import Engine
from test_pipeline import fast_tokenizer  # noqa: F401  (a fixture)
from test_pipeline import ROLES, digit_model, malt, ones_dataset

THETAS = [0.25, 0.5]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("rounds")
    return digit_model(base / "model"), ones_dataset(base / "ones.jsonl", 4)


@pytest.fixture
def torch_threads():
    n = torch.get_num_threads()  # run_pipeline sets the config's thread count process-wide
    yield
    torch.set_num_threads(n)


def config(assets, tokenizer, run_dir, **over):
    model, data = assets
    cfg = {"model": str(model), "tokenizer": str(tokenizer), "run_dir": str(run_dir),
           "threads": 1, "dataset": str(data), "train_questions": 4, "n": 2,
           "chunk_questions": 2, "rounds": 2,
           "sampling": {"temperature": 1.0, "max_new_tokens": 8},
           # the roles share one multi-adapter engine, so the spy below can read which adapter
           # each role runs (merged role weights: tests/test_pipeline_finetune.py)
           "engine": {"max_batch": 16, "cache_tokens": 4096, "merge_adapters": False,
                      "multi_adapter": True},
           # the digit model often fills its 8-token budget: keep its cut replies (as open
           # turns), or a role can be left with nothing to train on in a round
           "credit": {"theta_schedule": THETAS, "cut_replies": "keep"},
           "train": {"batch_size": 2, "lora": {"rank": 2, "alpha": 4.0}, "tensorboard": False},
           "evaluate": {"seeds": [0, 1], "questions": 2, "chains": 3}}
    cfg.update(over)
    return resolve(cfg, source="rounds.yaml")


def spy_on_expansion(monkeypatch):
    """Record, for every expansion, the engines it got and the adapter weights they run."""
    seen = []
    real = expand_mod.run_expand

    def spy(examples, engine, out_path, *args, **kwargs):
        if isinstance(engine, Engine):
            seen.append({"path": out_path, "shared": True, "adapter": engine.model.adapter})
        else:
            # (engine, adapter) pairs of one multi-adapter engine, or an AdapterView per role
            bound = {r: (e[0].model.inner, e[1]) if isinstance(e, tuple) else
                     (e.model.inner, e.model.adapter) for r, e in engine.items()}
            seen.append({"path": out_path, "shared": False,
                         "adapters": {r: a for r, (_, a) in bound.items()},
                         "weights": {r: {k: v.clone() for k, v in
                                         adapter_state_dict(inner, r).items()}
                                     for r, (inner, _) in bound.items()}})
        return real(examples, engine, out_path, *args, **kwargs)

    monkeypatch.setattr(expand_mod, "run_expand", spy)
    return seen


def adapters(ckpt):
    return {r: load_file(ckpt / r / "adapter_model.safetensors") for r in ROLES}


def test_two_rounds(assets, fast_tokenizer, tmp_path, monkeypatch, torch_threads):
    cfg = config(assets, fast_tokenizer, tmp_path / "run")
    seen = spy_on_expansion(monkeypatch)
    printed = []
    results = run_pipeline(cfg, log=lambda *a: printed.append(" ".join(map(str, a))))
    run = tmp_path / "run"

    # two rounds of data side by side, each credited with its scheduled threshold
    for r, theta in zip((1, 2), THETAS):
        d = run / f"round-{r}"
        trees = [json.loads(line) for line in open(d / "trees.jsonl")]
        assert sorted(t["id"] for t in trees) == [f"one-{i}" for i in range(4)]
        summary = json.loads((d / "data" / "summary.json").read_text())
        assert summary["theta"] == theta and summary["trees"] == str(d / "trees.jsonl")
        scored = [json.loads(line) for line in open(d / "data" / "trees.jsonl")]
        for t in scored:  # the labels were decided with this round's theta
            for g in t["generations"]:
                assert g["positive"] == (g["value"] > theta)
                for v in g["verifications"]:
                    assert v["positive"] == (v["value"] > theta)
        for role in ROLES:
            assert (d / "train" / "checkpoints" / role / "adapter_model.safetensors").is_file()
        res = json.loads((d / "eval" / "results.json").read_text())
        assert {"SA", "MA", "MALT", "MALT+MV@3"} <= set(res["methods"])
        assert json.loads((d / "round.json").read_text())["theta"] == theta
    assert not (run / "trees.jsonl").exists()  # rounds > 1: nothing in the single-round layout
    # the untrained baselines are the same model and seeds in every round: evaluated once
    r1, r2 = (json.loads((run / f"round-{r}" / "eval" / "results.json").read_text())
              for r in (1, 2))
    assert r2["methods"]["MA"] == r1["methods"]["MA"] and r2["transitions"]["MA"] == \
        r1["transitions"]["MA"]
    assert results == r2

    # round 1 expands with the base model on one shared engine; round 2 with one engine per
    # role, each running that role's adapter exactly as round 1 saved it
    assert [s["path"] for s in seen] == [run / "round-1" / "trees.jsonl",
                                         run / "round-2" / "trees.jsonl"]
    assert seen[0]["shared"] and seen[0]["adapter"] is None
    assert not seen[1]["shared"] and seen[1]["adapters"] == {r: r for r in ROLES}
    saved = adapters(run / "round-1" / "train" / "checkpoints")
    for role in ROLES:
        used = seen[1]["weights"][role]
        assert used.keys() == saved[role].keys()
        assert all(torch.equal(used[k], saved[role][k]) for k in used)
        assert any(k.endswith("lora_B.weight") and used[k].abs().sum() > 0 for k in used), \
            f"round 1 left the {role} adapter untrained"
    rounds_json = json.loads((run / "round-2" / "round.json").read_text())
    assert rounds_json["adapters_from"] == str(run / "round-1" / "train" / "checkpoints")
    # round 2 trained on from there: its adapters moved away from round 1's
    later = adapters(run / "round-2" / "train" / "checkpoints")
    assert any(not torch.equal(later[r][k], saved[r][k]) for r in ROLES for k in saved[r])

    # the comparison: rounds.json / rounds.md / plots/rounds.png and a printed line per round
    summary = json.loads((run / "rounds.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2]
    assert [row["theta"] for row in summary["rounds"]] == [None] + THETAS
    assert summary["rounds"][0]["pipeline"] == r1["methods"]["MA"]
    assert summary["rounds"][2]["pipeline_mv"] == r2["methods"]["MALT+MV@3"]
    md = (run / "rounds.md").read_text()
    assert "| 1 | 0.25 |" in md and "| 2 | 0.5 |" in md
    assert (run / "plots" / "rounds.png").stat().st_size > 1000
    out = "\n".join(printed)
    table = out[out.index("accuracy per round"):]
    for r, theta in zip((1, 2), THETAS):
        line = next(ln for ln in table.splitlines() if ln.split()[:2] == [str(r), f"{theta:g}"])
        assert line.count("±") == 2
    assert str(run / "round-2" / "train" / "checkpoints") in out

    # resume: round 2's training and evaluation lost; the rerun (a fresh model, as a new
    # process would load) trains round 2 again from round 1's saved adapters and ends with the
    # same weights and results
    shutil.rmtree(run / "round-2" / "train")
    shutil.rmtree(run / "round-2" / "eval")
    (run / "rounds.json").unlink()
    seen.clear()
    again = run_pipeline(cfg, log=lambda *a: None)
    assert [s["path"] for s in seen] == []  # both rounds' trees were complete: not expanded
    resumed = adapters(run / "round-2" / "train" / "checkpoints")
    assert all(torch.equal(resumed[r][k], later[r][k]) for r in ROLES for k in later[r])
    assert again == results
    assert json.loads((run / "rounds.json").read_text()) == summary


def test_linear_schedule_and_default():
    cfg = {"rounds": 3, "credit": {"theta_schedule": {"start": 0.5, "end": 0.75}}}
    assert round_thetas(resolve(cfg)) == [0.5, 0.625, 0.75]
    assert round_thetas(resolve({"rounds": 2, "credit": {"theta": 0.6}})) == [0.6, 0.6]
    assert round_thetas(resolve({})) == [0.5]


@pytest.mark.parametrize("cfg, message", [
    ({"rounds": 0}, "field 'rounds': expected an integer >= 1"),
    ({"rounds": 2.5}, "field 'rounds'"),
    ({"rounds": 3, "credit": {"theta_schedule": [0.5, 0.75]}},
     "field 'credit.theta_schedule': has 2 thresholds, rounds is 3"),
    ({"rounds": 2, "credit": {"theta_schedule": [0.5, 1.5]}}, "in [0, 1)"),
    ({"rounds": 2, "credit": {"theta_schedule": {"start": 0.5}}}, "{start: THETA, end: THETA}"),
    ({"rounds": 2, "credit": {"theta_schedule": "rising"}}, "expected a list"),
])
def test_bad_rounds_config(cfg, message):
    with pytest.raises(MaltError) as e:
        resolve(cfg, source="rounds.yaml")
    assert str(e.value).startswith("rounds.yaml: ") and message in str(e.value)


def test_bad_schedule_from_the_command_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 2\ncredit: {theta_schedule: [0.5]}\n")
    proc = malt("run", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("malt-fast: error: " + str(bad) + ": field "
                                   "'credit.theta_schedule': has 1 thresholds, rounds is 2 "
                                   "(one threshold per round)")
