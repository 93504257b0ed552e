"""`malt-fast run` with `train.finetune: full` (each role its own model, HF checkpoints) and with a
subset of roles (`train.roles: [verifier]`): which weights each role's engine decodes with in
evaluation and in the next round's expansion."""

import json

import torch
from safetensors.torch import load_file

import malt_fast.eval.evaluate as evaluate_mod
import malt_fast.malt.expand as expand_mod
import pytest

from malt_fast.model import load_model
from malt_fast.model.lora import (AdapterView, MultiAdapterView, adapter_state_dict, load_adapter,
                                  merged_model)
from malt_fast.pipeline import Run, resolve, run_pipeline
from malt_fast.pipeline.train import load_trained
from malt_fast.train.trainer import Trainer
from test_pipeline import fast_tokenizer  # noqa: F401  (a fixture)
from test_pipeline import ROLES
from test_rounds import assets, torch_threads  # noqa: F401  (fixtures)


def config(assets, tokenizer, run_dir, train, **over):
    model, data = assets
    cfg = {"model": str(model), "tokenizer": str(tokenizer), "run_dir": str(run_dir),
           "threads": 1, "dataset": str(data), "train_questions": 4, "n": 2,
           "chunk_questions": 4, "sampling": {"temperature": 1.0, "max_new_tokens": 8},
           "engine": {"max_batch": 16, "cache_tokens": 4096},
           # the digit model often fills its budget: keep its cut replies (as open turns)
           "credit": {"cut_replies": "keep"},
           "train": {"batch_size": 4, "sft_lr": 1e-3, "dpo_lr": 1e-3, "tensorboard": False,
                     **train},
           "evaluate": {"seeds": [0], "questions": 2, "chains": 3}}
    return resolve({**cfg, **over}, source="finetune.yaml")


def weights_of(engine):
    """The tensors an engine decodes with, under our names: (adapter name, {name: tensor});
    a merged model (engine.merge_adapters) has no adapter, its merged weights are the tensors.
    `engine` may be an (engine, adapter) pair of a multi-adapter engine."""
    if isinstance(engine, tuple):
        engine, adapter = engine
        view = engine.model
        assert isinstance(view, MultiAdapterView)
        if adapter is not None:
            return adapter, {k: v.clone() for k, v in
                             adapter_state_dict(view.inner, adapter).items()}
        return None, {k: v.clone() for k, v in view.inner.state_dict().items()}
    view = engine.model
    if not isinstance(view, AdapterView):
        return None, {k: v.clone() for k, v in view.state_dict().items()}
    if view.adapter is not None:
        return view.adapter, {k: v.clone() for k, v in
                              adapter_state_dict(view.inner, view.adapter).items()}
    return None, {k: v.clone() for k, v in view.inner.state_dict().items()}


def spy(monkeypatch):
    """Record the role engines of every expansion and evaluation."""
    seen = {"expand": [], "evaluate": []}
    real_expand, real_evaluate = expand_mod.run_expand, evaluate_mod.evaluate_seeds

    def expand(examples, engine, *args, **kwargs):
        if isinstance(engine, dict):
            seen["expand"].append({r: weights_of(e) for r, e in engine.items()})
        return real_expand(examples, engine, *args, **kwargs)

    def evaluate(test, base_engines=None, trained_engines=None, *args, **kwargs):
        if isinstance(trained_engines, dict):
            seen["evaluate"].append({r: weights_of(e) for r, e in trained_engines.items()})
        return real_evaluate(test, base_engines, trained_engines, *args, **kwargs)

    monkeypatch.setattr(expand_mod, "run_expand", expand)
    monkeypatch.setattr(evaluate_mod, "evaluate_seeds", evaluate)
    return seen


def hf_weights(ckpt):
    """An HF export's tensors under our names (lm_head kept; this model is untied)."""
    return {k.removeprefix("model."): v for k, v in load_file(ckpt / "model.safetensors").items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_two_rounds(assets, fast_tokenizer, tmp_path, monkeypatch, torch_threads):
    cfg = config(assets, fast_tokenizer, tmp_path / "run", {"finetune": "full"}, rounds=2)
    seen = spy(monkeypatch)
    starts = []
    real_start = Trainer.start_model

    def start_model(self, role):
        model = real_start(self, role)
        starts.append((self.out_dir, role, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(Trainer, "start_model", start_model)
    results = run_pipeline(cfg, log=lambda *a: None)
    assert {"MALT", "MALT+MV@3"} <= set(results["methods"])

    run = tmp_path / "run"
    ckpt = {r: run / f"round-{r}" / "train" / "checkpoints" for r in (1, 2)}
    for r in (1, 2):
        for role in ROLES:  # HF models, no adapters
            assert sorted(p.name for p in (ckpt[r] / role).iterdir()) == [
                "config.json", "model.safetensors"]
    exported = {r: {role: hf_weights(ckpt[r] / role) for role in ROLES} for r in (1, 2)}
    base = hf_weights(assets[0])

    # evaluation of each round decodes every role through that round's own trained model
    assert len(seen["evaluate"]) == 2
    for r, engines in zip((1, 2), seen["evaluate"]):
        for role in ROLES:
            adapter, weights = engines[role]
            assert adapter is None and same(weights, exported[r][role]), (r, role)
            assert not same(weights, base), (r, role)  # trained
    # round 2 expanded with round 1's role models, and trained on from them (not from the base)
    assert len(seen["expand"]) == 1
    for role in ROLES:
        assert same(seen["expand"][0][role][1], exported[1][role]), role
    round2 = {role: w for out, role, w in starts if out == run / "round-2" / "train"}
    assert set(round2) == set(ROLES)
    for role in ROLES:
        assert same(round2[role], exported[1][role]), role
        assert not same(exported[2][role], exported[1][role]), role
    info = json.loads((run / "round-2" / "round.json").read_text())
    assert info["adapters_from"] == str(ckpt[1]) and info["roles_from_adapters"] == list(ROLES)

    # a standalone evaluation (a new process: nothing in memory) finds the same models
    fresh = Run(cfg, log=lambda *a: None, round=2)
    assert load_trained(fresh)
    assert all(same(fresh.models.roles[r].state_dict(), exported[2][r]) for r in ROLES)


@pytest.mark.parametrize("engines", ["view", "merged", "multi"])
def test_subset_of_roles_evaluates_trained_and_base(assets, fast_tokenizer, tmp_path,
                                                    monkeypatch, torch_threads, engines):
    merge = engines == "merged"
    cfg = config(assets, fast_tokenizer, tmp_path / "run",
                 {"roles": ["verifier"], "lora": {"rank": 2, "alpha": 4.0}},
                 engine={"max_batch": 16, "cache_tokens": 4096, "merge_adapters": merge,
                         "multi_adapter": engines == "multi"})
    seen = spy(monkeypatch)
    run_pipeline(cfg, log=lambda *a: None)
    ckpt = tmp_path / "run" / "train" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["verifier"]
    saved = load_file(ckpt / "verifier" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())

    base = hf_weights(assets[0])

    if merge:  # the base with the saved verifier adapter folded in, computed independently
        model = load_model(assets[0])
        load_adapter(model, ckpt / "verifier", "verifier")
        want = merged_model(model, "verifier").state_dict()

    def check(engines):
        if merge:
            assert engines["verifier"][0] is None and same(engines["verifier"][1], want)
            assert not same(engines["verifier"][1], base)
        else:
            assert engines["verifier"][0] == "verifier" and same(engines["verifier"][1], saved)
        for role in ("generator", "refiner"):  # untrained roles: the base, no adapter active
            adapter, weights = engines[role]
            weights = {k.replace(".base.", "."): v for k, v in weights.items()
                       if ".lora_" not in k}
            assert adapter is None and same(weights, base), role

    [engines] = seen["evaluate"]
    check(engines)
    # the standalone evaluation used to require all three roles' adapters and then left the
    # trained pipeline out; it loads the trained verifier and the base for the others
    fresh = Run(cfg, log=lambda *a: None)
    assert load_trained(fresh)
    check({r: weights_of(e) for r, e in fresh.models.role_engines().items()})
