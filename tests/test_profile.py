"""Profiling: `malt-fast profile` writes a torch.profiler trace with a range for every phase and
a profile.md table; the phase accounting (exclusive times, evaluation absorbing its rollout)."""

import json
import time

import pytest

from malt_fast.errors import MaltError
from malt_fast.profile import PHASES, Profiler, fresh_run_dir, short_config
from malt_fast.pipeline import resolve
from test_pipeline import fast_tokenizer  # noqa: F401  (a fixture)
from test_pipeline import digit_model, malt, ones_dataset, write_config

TRACE_CALLS = 3


def test_profile_command(tmp_path, fast_tokenizer):
    model = digit_model(tmp_path / "model")
    data = ones_dataset(tmp_path / "ones.jsonl", 4)
    cfg = write_config(tmp_path / "p.yaml", model, fast_tokenizer, tmp_path / "run",
                       dataset=str(data), train_questions=20, sampling={"max_new_tokens": 8},
                       evaluate={"seeds": [0, 1, 2], "questions": 10})
    proc = malt("profile", cfg, "--questions", 2, "--trace-calls", TRACE_CALLS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run-profile"  # its own directory: the config's run_dir is not touched
    assert not (tmp_path / "run").exists() and (run / ".malt-profile").is_file()
    # the short run: 2 questions, one seed
    assert len((run / "trees.jsonl").read_text().splitlines()) == 2
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["seeds"] == [0] and results["questions"] == 2
    summary = json.loads((run / "data" / "summary.json").read_text())
    assert summary["roles"]["refiner"]["pairs"] > 0  # or there would be no DPO phase to see

    trace = json.loads((run / "profile" / "trace.json").read_text())  # valid JSON
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    ranges = {}
    for e in events:
        if e["name"].startswith("malt/"):
            ranges.setdefault(e["name"], []).append(e)
    for key, _ in PHASES:
        assert f"malt/{key}" in ranges, f"no trace events for phase {key}"
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    assert any(o["name"] == "aten::mm" or o["name"] == "aten::addmm" or
               o["name"] == "aten::linear" for o in ops)

    def inside(r):
        return sum(r["ts"] <= o["ts"] <= r["ts"] + r["dur"] for o in ops)

    # op events only for the first TRACE_CALLS calls of a phase; every call keeps its range
    decode = sorted(ranges["malt/decode"], key=lambda e: e["ts"])
    assert len(decode) > TRACE_CALLS
    assert all(inside(r) > 0 for r in decode[:TRACE_CALLS])
    assert all(inside(r) == 0 for r in decode[TRACE_CALLS:])

    rep = json.loads((run / "profile" / "profile.json").read_text())
    rows = {r["phase"]: r for r in rep["phases"]}
    assert [r["phase"] for r in rep["phases"]] == [k for k, _ in PHASES] + ["other"]
    for key, _ in PHASES:
        assert rows[key]["wall_s"] > 0, key
    for key in ("prefill", "decode", "sft", "dpo", "reference", "evaluate"):
        assert rows[key]["tokens"] > 0 and rows[key]["tokens_per_s"] > 0, key
    assert rows["decode"]["calls"] == len([r for r in decode if not within_evaluation(r, ranges)])
    assert rows["sft"]["calls"] >= 1 and rows["dpo"]["calls"] >= 1  # optimizer steps
    assert sum(r["share"] for r in rep["phases"]) == pytest.approx(1.0, abs=1e-6)
    assert sum(r["wall_s"] for r in rep["phases"]) == pytest.approx(rep["wall_s"], rel=1e-6)
    assert rep["device"] == "cpu" and all(r["mfu"] is None for r in rep["phases"])
    assert rows["decode"]["peak_mib"] > 10  # max RSS: the process holds at least torch

    md = (run / "profile" / "profile.md").read_text()
    for _, label in PHASES:
        assert f"| {label} |" in md
    assert "MFU: unknown for cpu" in md and "trace.json" in md
    assert "| evaluation |" in proc.stdout and "trace:" in proc.stdout


def within_evaluation(r, ranges):
    return any(e["ts"] <= r["ts"] <= e["ts"] + e["dur"] for e in ranges["malt/evaluate"])


def test_phase_accounting():
    prof = Profiler()
    prof.t0 = time.perf_counter()
    with prof.phase("dpo"):
        time.sleep(0.1)
        with prof.phase("reference"):
            time.sleep(0.1)
            prof.count(tokens=100)
        prof.count(tokens=10)
    with prof.phase("evaluate", absorb=True):
        with prof.phase("decode"):  # inside evaluation: counted there, not as decode
            time.sleep(0.1)
            prof.count(tokens=7)
    prof.wall_s = time.perf_counter() - prof.t0
    st = prof.stats
    assert 0.1 <= st["reference"].wall_s < 0.19 and st["reference"].tokens == 100
    assert 0.1 <= st["dpo"].wall_s < 0.19 and st["dpo"].tokens == 10  # reference taken out
    assert st["decode"].wall_s == 0 and st["decode"].tokens == 0
    assert st["evaluate"].wall_s >= 0.1 and st["evaluate"].tokens == 7
    rep = prof.report()
    assert sum(r["wall_s"] for r in rep["phases"]) == pytest.approx(prof.wall_s)


def test_short_config_and_fresh_dir(tmp_path):
    cfg = resolve({"run_dir": str(tmp_path / "r"), "rounds": 2, "train_questions": 50,
                   "credit": {"theta_schedule": [0.5, 0.7]}})
    short = short_config(cfg, questions=3)
    assert short["train_questions"] == 3 and short["evaluate"]["questions"] == 3
    assert short["evaluate"]["seeds"] == [0] and short["rounds"] == 1
    assert short["run_dir"] == str(tmp_path / "r-profile")
    assert cfg["rounds"] == 2 and cfg["evaluate"]["seeds"] == [0, 1, 2]  # not modified
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a real run")
    with pytest.raises(MaltError, match="not made by `malt-fast profile`"):
        fresh_run_dir(mine)
    assert (mine / "keep.txt").is_file()
    old = fresh_run_dir(tmp_path / "p")
    (old / "stale.json").write_text("{}")
    assert not (fresh_run_dir(old) / "stale.json").exists()  # an earlier profile: replaced


def test_flops_count_the_model_weights():
    import torch

    from malt_fast.model.llama import Llama, LlamaConfig
    from malt_fast.profile import gpu_peak_flops, matmul_params

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Llama(cfg)
    body = sum(p.numel() for n, p in model.named_parameters() if "proj" in n)
    assert matmul_params(cfg) == (body, model.lm_head.weight.numel())
    prof = Profiler()
    prof.see_model(model)
    assert prof.flops_per_token("train") == 2 * prof.flops_per_token("forward") \
        == 4 * (body + 96 * 32)
    peak, why = gpu_peak_flops(torch.device("cpu"), torch.float32)
    assert peak is None and "unknown for cpu" in why


def test_phases_are_marked_at_their_call_sites():
    """The engine's prefill and decode are torch.profiler ranges under any profiler (nothing is
    patched or found by name); under `collecting`, the same calls are timed and counted."""
    import torch
    from torch.profiler import profile

    from malt_fast.model.llama import Llama, LlamaConfig
    from malt_fast.phases import collecting
    from malt_fast.rollout import Engine

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2)).eval()
    engine = Engine(model, max_batch=4, cache_tokens=512, progress=False)
    with profile() as p:
        engine.generate([[5, 6, 7]], n=2, max_new_tokens=6)
    names = {e.name for e in p.events()}
    assert {"malt/prefill", "malt/decode"} <= names
    prof = Profiler(None)
    with collecting(prof):
        engine.generate([[5, 6, 7, 8]], n=2, max_new_tokens=6)
    st, stats = prof.stats, engine.stats
    assert st["prefill"].tokens == stats["prefill_tokens"] == 4 and st["prefill"].calls == 1
    # every token but the two first ones (sampled from the prefill's logits) is a decode token
    assert st["decode"].tokens == stats["generated_tokens"] - 2 == 10
    assert st["decode"].calls == stats["decode_steps"] + 1  # the last step only collects
    assert st["decode"].flops == 10 * prof.flops_per_token("forward") > 0
