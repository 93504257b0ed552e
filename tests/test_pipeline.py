"""`malt-fast run` end to end on tiny models with the packaged tokenizer; resume after a lost
tree; kill-and-resume (SIGKILL) during expansion, training and evaluation; bad configs.

The helpers here (`digit_model`, `ones_dataset`, `write_config`, `malt`) are shared with
test_rounds.py and test_profile.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from malt_fast.model import save_model
from malt_fast.model.llama import Llama, LlamaConfig

ROLES = ("generator", "verifier", "refiner")
ONE, X, EOS = 33, 104, 2  # SmolLM2 tokens "1", "x", <|im_end|>


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True, eos_token_id=2))
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, path)
    return path


def digit_model(path):
    """A tiny random Llama that writes strings of "1" and "x" (e.g. "11x1x"), sometimes ending
    early: with the gold answer "1" its answers are right often enough, and wrong often enough,
    that credit finds positive and negative siblings and every role gets SFT rows and DPO pairs
    (a plain random model is never right, so nothing would be trained).

    How: every token embedding has a large constant first coordinate, the layers are small
    next to it, so the final hidden state always points along that coordinate; the LM head
    gives "1", "x" and EOS a large positive weight there and every other token a negative one.
    ("x" rather than a space: a completion starting with a space does not re-tokenize as a
    continuation of the chat prompt.)"""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=False, eos_token_id=EOS))
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.3)
        model.embed_tokens.weight[:, 0] = 4.0
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(0.5)
        w = model.lm_head.weight
        w.normal_(0, 0.3)
        w[:, 0] = -2.0
        w[ONE, 0], w[X, 0], w[EOS, 0] = 1.9, 2.0, 1.6
    save_model(model, path)
    return path


def ones_dataset(path, k=8):
    """k training and k test questions whose gold answer is 1 (native JSONL rows with a split
    field; the test questions are other ones)."""
    rows = [{"id": f"one-{i}", "dataset": "arith", "question": f"What is {i + 1} minus {i}?",
             "gold": "1", "split": "train"} for i in range(k)]
    rows += [{"id": f"one-test-{i}", "dataset": "arith", "gold": "1", "split": "test",
              "question": f"What is {i + 21} minus {i + 20}?"} for i in range(k)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizer_dir(tmp_path_factory, gguf):
    """The packaged tokenizer saved once per session as an HF directory: a fresh process loads
    it several seconds faster than the GGUF file, whose vocabulary and merges are parsed from
    the GGUF metadata, and the kill tests start seven processes."""
    path = tmp_path_factory.getbasetemp() / "smollm2-tokenizer"
    if not (path / "tokenizer.json").is_file():
        from malt_fast.model import load_tokenizer

        tok = load_tokenizer(gguf)
        tmp = path.with_name(path.name + ".tmp")
        tok.hf.chat_template = tok.chat_template
        tok.hf.save_pretrained(str(tmp))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id":
                                                                 tok.eos_token_ids}))
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory, smollm_gguf):
    return tokenizer_dir(tmp_path_factory, smollm_gguf)


def write_config(path, model, tokenizer, run_dir, **over):
    # threads: 1 -- on a shared 2-core machine, two OpenMP threads per tiny matmul wait on each
    # other far longer than they compute
    cfg = {"model": str(model), "tokenizer": str(tokenizer), "run_dir": str(run_dir),
           "threads": 1, "dataset": "arith", "train_questions": 3, "n": 2, "chunk_questions": 2,
           "sampling": {"temperature": 1.0, "max_new_tokens": 6},
           "engine": {"max_batch": 16, "cache_tokens": 4096},
           "train": {"batch_size": 2, "lora": {"rank": 2, "alpha": 4.0}, "tensorboard": False},
           "evaluate": {"seeds": [0, 1], "questions": 2, "chains": 3}}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path.write_text(json.dumps(cfg))
    return path


def malt(*args):
    return subprocess.run([sys.executable, "-m", "malt_fast.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def nodes_at(trees, level):
    """Every generation (level 0), verification (1) or refinement (2) of the trees."""
    nodes = [g for t in trees for g in t["generations"]]
    for key in ("verifications", "refinements")[:level]:
        nodes = [c for n in nodes for c in n[key]]
    return nodes


def test_run_end_to_end_and_rerun_skips(smollm_gguf, tmp_path):
    # the digit model is right sometimes, so every role and the STaR baseline get rows; it
    # stops early sometimes and runs into the 6-token budget more often, so this run keeps the
    # cut replies (as open turns), or little would be left to train
    cfg = write_config(tmp_path / "run.yaml", digit_model(tmp_path / "model"), smollm_gguf,
                       tmp_path / "run", credit={"cut_replies": "keep"}, evaluate={"star": True})
    proc = malt("run", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    trees = [json.loads(line) for line in open(run / "trees.jsonl")]
    assert len(trees) == 3 and len({t["id"] for t in trees}) == 3
    for t in trees:  # n=2 at every level: 2, 4, 8 nodes
        assert len(t["generations"]) == 2
        assert all(len(g["verifications"]) == 2 for g in t["generations"])
        assert all(len(v["refinements"]) == 2 for g in t["generations"] for v in g["verifications"])
    # every reply says why it ended and how many tokens it took
    summary = json.loads((run / "data" / "summary.json").read_text())
    for role, level in zip(ROLES, (nodes_at(trees, 0), nodes_at(trees, 1), nodes_at(trees, 2))):
        for node in level:
            if role == "verifier":  # the critique, then its appended verdict line and word
                # (the digit model glues letters to the word: "incorrectx" reads as no verdict)
                assert "\nVerdict: correct" in node["text"] or \
                    "\nVerdict: incorrect" in node["text"]
                assert "verdict" in node and node["finish"] in ("eos", "stop", "length")
                continue
            assert node["finish"] in ("eos", "length") and 1 <= node["tokens"] <= 6
            assert node["finish"] == "eos" or node["tokens"] == 6  # EOS as 6th token: "eos"
        cut = sum(node["finish"] == "length" for node in level)
        assert summary["roles"][role]["cut"] == cut
        assert summary["roles"][role]["cut_fraction"] == pytest.approx(cut / len(level))
    assert {n["finish"] for level in (0, 2) for n in nodes_at(trees, level)} == {"eos", "length"}
    assert "replies cut by the token budget: generator" in proc.stdout
    assert "trained as open turns" in proc.stdout
    cut_texts = {n["text"] for level in range(3) for n in nodes_at(trees, level)
                 if n["finish"] == "length"}
    rows = [json.loads(line) for role in ROLES
            for line in open(run / "data" / f"sft_{role}.jsonl")]
    assert any(r.get("cut") for r in rows)
    assert all(r.get("cut", False) == (r["completion"] in cut_texts) for r in rows)
    for role in ROLES:
        assert (run / "data" / f"sft_{role}.jsonl").is_file()
        assert (run / "train" / "checkpoints" / role / "adapter_config.json").is_file()
    star_rows = (run / "data" / "sft_star.jsonl").read_text().splitlines()
    assert star_rows and all(json.loads(r)["completion"].strip() for r in star_rows)
    star = load_file(str(run / "train" / "checkpoints" / "star" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in star.items())
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results["methods"]) == ["SA", "SA+MV@3", "MA", "MA+MV@3", "STaR", "STaR+MV@3",
                                        "MALT", "MALT+MV@3"]
    for m in results["methods"]:
        r = results["methods"][m]
        assert len(r["per_seed"]) == 2 and 0.0 <= r["mean"] <= 1.0 and r["std"] >= 0.0
    report = (run / "eval" / "report.md").read_text()
    assert "| MALT+MV@3 |" in report and " ± " in report
    assert (run / "eval" / "plots" / "accuracy.png").stat().st_size > 1000
    # the printed table: every method with mean ± std, then where the outputs are
    for m in results["methods"]:
        line = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == [m])
        assert "±" in line
    for what in ("report:", "plot:", "checkpoints:", "metrics:"):
        assert what in proc.stdout
    assert str(run / "train" / "checkpoints") in proc.stdout

    again = malt("run", cfg)  # everything complete: every stage is skipped, results unchanged
    assert again.returncode == 0, again.stderr[-2000:]
    assert "expand:" in again.stdout and "skipped" in again.stdout
    assert "evaluate:" in again.stdout
    assert json.loads((run / "eval" / "results.json").read_text()) == results

    # a field evaluation depends on changed: a clear stop, nothing recomputed or overwritten
    before = {p: p.read_bytes() for p in (run / "trees.jsonl", run / "data" / "summary.json",
                                          run / "eval" / "results.json")}
    stale = malt("run", cfg, "--set", "evaluate.questions=3")
    assert stale.returncode == 2
    err = stale.stderr.strip()
    assert err.startswith("malt-fast: error: evaluate: ") and "\n" not in err, err
    assert "evaluate.questions (2 -> 3)" in err and "--restart evaluate" in err
    assert all(p.read_bytes() == b for p, b in before.items())
    # --restart evaluate: only the evaluation is recomputed, with the new setting
    redo = malt("run", cfg, "--set", "evaluate.questions=3", "--restart", "evaluate")
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert json.loads((run / "eval" / "results.json").read_text())["questions"] == 3
    assert "expand:" in redo.stdout and "credit:" in redo.stdout and "train:" in redo.stdout
    for p in (run / "trees.jsonl", run / "data" / "summary.json"):
        assert p.read_bytes() == before[p]
    # a field expansion depends on: the first stage stops, naming it
    stale = malt("run", cfg, "--set", "sampling.temperature=0.7", "--set",
                 "evaluate.questions=3")
    assert stale.returncode == 2 and "expand: " in stale.stderr
    assert "sampling.temperature (1.0 -> 0.7)" in stale.stderr


def test_expand_resumes_after_a_lost_tree(tiny_model, fast_tokenizer, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_model, fast_tokenizer, tmp_path / "run")
    assert malt("expand", cfg).returncode == 0
    path = tmp_path / "run" / "trees.jsonl"
    full = path.read_text().splitlines()
    path.write_text("\n".join(full[:1]) + "\n" + full[1][: len(full[1]) // 2])  # killed mid-write
    proc = malt("expand", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = path.read_text().splitlines()
    assert sorted(resumed) == sorted(full)  # same trees, none twice, none lost


# ------------------------------------------------------------------ kill and resume


KILL_QUESTIONS = 4


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, fast_tokenizer):
    """The config every kill test runs, and one uninterrupted reference run of it."""
    base = tmp_path_factory.mktemp("kill")
    model = digit_model(base / "model")
    data = ones_dataset(base / "ones.jsonl", KILL_QUESTIONS)

    def config(run_dir):
        # one question per chunk: trees.jsonl grows while expansion runs; save_every 1 and
        # batch 1: training leaves a resumable state after every step; three seeds: the
        # evaluation has a finished seed while later ones still run; the digit model fills its
        # budget often, so its cut replies are kept (as open turns) to leave rows to train on
        return write_config(run_dir.parent / f"{run_dir.name}.yaml", model, fast_tokenizer,
                            run_dir, dataset=str(data), train_questions=KILL_QUESTIONS,
                            chunk_questions=1, sampling={"max_new_tokens": 8},
                            credit={"cut_replies": "keep"},
                            train={"batch_size": 1, "save_every": 1},
                            evaluate={"seeds": [0, 1, 2], "questions": 2})

    ref = base / "ref"
    proc = malt("run", config(ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ref / "data" / "summary.json").read_text())
    # the runs must train something, or "killed during training" tests nothing
    assert all(summary["roles"][r]["sft"] > 0 for r in ROLES), summary
    assert summary["roles"]["refiner"]["pairs"] > 0, summary
    return config, ref


def lines(path):
    return path.read_text().count("\n") if path.is_file() else 0


# stage -> (the run is inside that stage, proof it had not finished it when killed)
KILL_POINTS = {
    "expand": (lambda d: lines(d / "trees.jsonl") >= 1,
               lambda d: lines(d / "trees.jsonl") < KILL_QUESTIONS),
    # three optimizer steps logged: a rerun that started over would log them all again
    "train": (lambda d: lines(d / "train" / "metrics.jsonl") >= 3,
              lambda d: not (d / "train" / "checkpoints" / "refiner").is_dir()),
    "evaluate": (lambda d: (d / "eval" / "seeds" / "seed-0.json").is_file(),
                 lambda d: not (d / "eval" / "results.json").exists()),
}


def kill_when(cmd, ready, timeout=300):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill "
                                     f"point: {proc.stderr.read()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError("the kill point never came")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    return proc.returncode


def assert_same_outputs(ref, run):
    ids = [json.loads(line)["id"] for line in open(run / "trees.jsonl")]
    assert len(ids) == len(set(ids)) == KILL_QUESTIONS  # no tree lost or written twice
    assert sorted(open(run / "trees.jsonl")) == sorted(open(ref / "trees.jsonl"))
    for name in ["trees.jsonl"] + [f"{k}_{r}.jsonl" for k in ("sft", "dpo") for r in ROLES]:
        assert (run / "data" / name).read_bytes() == (ref / "data" / name).read_bytes(), name
    for r in ROLES:
        pairs = [json.loads(line)["id"] for line in open(run / "data" / f"dpo_{r}.jsonl")]
        assert len(pairs) == len(set(pairs))
    got, want = (json.loads((d / "data" / "summary.json").read_text()) for d in (run, ref))
    got.pop("trees"), want.pop("trees")  # the trees' path names the run directory
    assert got == want
    for r in ROLES:
        a = load_file(run / "train" / "checkpoints" / r / "adapter_model.safetensors")
        b = load_file(ref / "train" / "checkpoints" / r / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r
    # the verifier's scores are fp32 probabilities whose rounding depends on the decode batch
    # (a resumed evaluation batches fewer seeds); everything else must be equal
    assert_equal_but_scores(json.loads((run / "eval" / "results.json").read_text()),
                            json.loads((ref / "eval" / "results.json").read_text()))


def assert_equal_but_scores(got, want, where="results"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            if k in ("score", "auroc") and want[k] is not None:
                assert got[k] == pytest.approx(want[k], abs=1e-4), f"{where}.{k}"
            else:
                assert_equal_but_scores(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_equal_but_scores(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_kill_and_resume_equals_uninterrupted(kill_setup, tmp_path, stage):
    config, ref = kill_setup
    run = tmp_path / "run"
    cfg = config(run)
    started, unfinished = KILL_POINTS[stage]
    rc = kill_when([sys.executable, "-m", "malt_fast.cli", "run", str(cfg)],
                   lambda: started(run))
    assert rc == -signal.SIGKILL
    assert unfinished(run), f"the kill came after {stage} had finished"
    steps_before = lines(run / "train" / "metrics.jsonl")
    seed0 = run / "eval" / "seeds" / "seed-0.json"
    seed0_mtime = seed0.stat().st_mtime_ns if seed0.is_file() else None
    proc = malt("run", cfg)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_outputs(ref, run)
    if stage == "train":  # resumed, not restarted: at most the step cut by the kill is redone
        redone = lines(run / "train" / "metrics.jsonl") - lines(ref / "train" / "metrics.jsonl")
        assert steps_before >= 3 and 0 <= redone <= 1, (steps_before, redone)
    if stage == "evaluate":  # the finished seed was kept, not evaluated again
        assert seed0.stat().st_mtime_ns == seed0_mtime


# ------------------------------------------------------------------ bad configs


def test_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: arith\nbogus: 1\n")
    proc = malt("run", bad)
    assert proc.returncode == 2 and "bad.yaml: unknown field 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad.write_text("dataset: arith\nevaluate: {seeds: [0], qestions: 3}\n")
    proc = malt("run", bad)
    assert proc.returncode == 2 and "bad.yaml: unknown field 'evaluate.qestions'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_combine_seeds_is_one_evaluation_over_all_seeds():
    from malt_fast.eval.evaluate import mean_std
    from malt_fast.pipeline.evaluate import combine_seeds

    def qs(seed, correct):  # two questions per seed, the given correctness each
        return {str(seed): {f"q{seed}-{k}": {"answer": "1", "correct": c}
                            for k, c in enumerate(correct)}}

    def part(seed, sa, ma, malt_):
        t = {"wrong_to_right": seed, "right_to_wrong": 1, "chains": 6}
        return {"dataset": "arith", "seeds": [seed], "questions": 2, "chains_per_question": 3,
                "per_question": {"SA": qs(seed, sa), "MA": qs(seed, ma), "MALT": qs(seed, malt_)},
                "transitions": {"MA": dict(t), "MALT": dict(t)}}

    e = {"seeds": [3, 5, 7], "questions": 2, "chains": 3}
    got = combine_seeds([part(3, [1, 0], [0.5, 0], [1, 1]), part(5, [0, 0], [1, 0], [1, 0]),
                         part(7, [1, 1], [0, 0], [0, 0])], e)
    assert list(got["methods"]) == ["SA", "MA", "MALT"]  # evaluate()'s method order
    assert got["methods"]["SA"]["per_seed"] == [0.5, 0.0, 1.0]
    mean, std = mean_std([1.0, 0.5, 0.0])
    assert got["methods"]["MALT"]["mean"] == mean and got["methods"]["MALT"]["std"] == std
    assert got["transitions"]["MA"] == {"wrong_to_right": 15, "right_to_wrong": 3, "chains": 18}
    assert got["seeds"] == [3, 5, 7] and got["questions"] == 2 and got["chains_per_question"] == 3
    assert set(got["per_question"]["MALT"]) == {"3", "5", "7"}
    (malt_ma, malt_sa) = [c for c in got["comparisons"] if c["a"] == "MALT"]
    assert (malt_ma["b"], malt_ma["units"]) == ("MA", 6)
    assert malt_ma["diff"] == pytest.approx(100 * (3 - 1.5) / 6)
    # a later round: untrained methods copied from round 1, only MALT combined from the parts
    base = {"per_question": {"SA": qs(0, [1, 1]) | qs(1, [0, 1]), "MA": qs(0, [0, 0]) | qs(1, [1, 0]),
                             "MALT": qs(0, [0, 0]) | qs(1, [0, 0])},
            "transitions": {"MA": {"wrong_to_right": 0, "right_to_wrong": 0, "chains": 1}}}
    later = [{"dataset": "arith", "per_question": {"MALT": qs(s, c)},
              "transitions": {"MALT": {"wrong_to_right": 1, "right_to_wrong": 0, "chains": 6}}}
             for s, c in ((0, [1, 0]), (1, [1, 1]))]
    got = combine_seeds(later, {"seeds": [0, 1], "questions": 2, "chains": 3}, base)
    assert got["methods"]["SA"]["per_seed"] == [1.0, 0.5]
    assert got["methods"]["MA"]["per_seed"] == [0.0, 0.5]
    assert got["methods"]["MALT"]["per_seed"] == [0.5, 1.0]  # round 1's MALT not copied
    assert got["transitions"] == {"MA": base["transitions"]["MA"],
                                  "MALT": {"wrong_to_right": 2, "right_to_wrong": 0, "chains": 12}}


def test_stop_after_answer_ends_each_turn_at_its_answer_or_verdict_line():
    from malt_fast.errors import MaltError
    from malt_fast.malt.expand import level_sampling
    from malt_fast.pipeline import resolve

    on = level_sampling(resolve({}))
    assert [on[r].stop_line for r in ROLES] == [("Final Answer:",), ("Verdict:",),
                                                ("Final Answer:",)]
    off = level_sampling(resolve({"sampling": {"stop_after_answer": False}}))
    assert all(off[r].stop_line == () for r in ROLES)
    with pytest.raises(MaltError, match="'sampling.stop_after_answer': expected true or false"):
        resolve({"sampling": {"stop_after_answer": "yes"}})
