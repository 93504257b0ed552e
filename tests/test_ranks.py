"""Expansion and evaluation across ranks (`torchrun --nproc_per_node 2 -m malt_fast.cli expand|
evaluate CONFIG`, gloo on the CPU): the merged trees.jsonl and results.json equal a one-process
run's; a rank that dies mid-expansion loses only its unfinished chunk, and a rerun with 2 ranks or
with one process finishes the work to the same files (docs/distributed.md, "Expansion and
evaluation across ranks"). Tiny digit model, fp32, one thread per rank; ~1 min on 2 cores,
most of it the five torchrun launches' process start-up."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from malt_fast.cli import main
from malt_fast.train.distributed import free_port
from test_pipeline import digit_model, fast_tokenizer, ones_dataset, write_config  # noqa: F401
from test_rounds import torch_threads  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 8  # chunks of 2: rank 0 expands chunks 0 and 2, rank 1 chunks 1 and 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fast_tokenizer):  # noqa: F811
    base = tmp_path_factory.mktemp("ranks")
    model = digit_model(base / "model")
    data = ones_dataset(base / "ones.jsonl", QUESTIONS)

    def config(run_dir):
        # three evaluation seeds = three parts: rank 0 evaluates seeds 0 and 2, rank 1 seed 1
        return write_config(run_dir.parent / f"{run_dir.name}.yaml", model, fast_tokenizer,
                            run_dir, dtype="float32", dataset=str(data),
                            train_questions=QUESTIONS, chunk_questions=2,
                            sampling={"max_new_tokens": 8},
                            evaluate={"seeds": [0, 1, 2], "questions": 3})
    return base, config


@pytest.fixture(scope="module")
def reference(setup):
    """One process, in this one (no launcher): trees.jsonl and results.json."""
    import torch

    base, config = setup
    ref = base / "ref"
    threads = torch.get_num_threads()
    try:
        assert main(["expand", str(config(ref))]) == 0
        assert main(["evaluate", str(config(ref))]) == 0
    finally:
        torch.set_num_threads(threads)
    return ref


def torchrun(*args, script=("-m", "malt_fast.cli"), env=None, ranks=2):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def chunk_records(run):
    return [r for r in map(json.loads, open(run / "metrics.jsonl"))
            if r["stage"] == "expand" and "chunk" in r]


def same_trees(run, ref):
    got = (run / "trees.jsonl").read_text().splitlines()
    want = (ref / "trees.jsonl").read_text().splitlines()
    assert len(got) == len({json.loads(x)["id"] for x in got}) == QUESTIONS
    assert sorted(got) == sorted(want)
    assert got == want  # rank 0 merges in the configured question order: byte for byte
    assert not list(run.glob("trees.rank-*.jsonl"))  # the parts are merged and gone


def test_two_ranks_equal_one_process(setup, reference, tmp_path):
    _, config = setup
    run = tmp_path / "run"
    proc = torchrun("expand", config(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_trees(run, reference)
    chunks = chunk_records(run)  # every chunk expanded once, by its rank: chunk k by k % 2
    assert sorted(r["chunk"] for r in chunks) == [0, 2, 4, 6]
    assert all(r["rank"] == (r["chunk"] // 2) % 2 and r["world_size"] == 2 for r in chunks)
    [stage] = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["stage"] == "expand"
               and "chunk" not in r]  # one stage record, by rank 0, with both ranks' counts
    assert stage["questions"] == QUESTIONS and [r["questions"] for r in stage["per_rank"]] == [4, 4]
    assert stage["generated_tokens"] == sum(r["generated_tokens"] for r in chunks)
    assert proc.stdout.count(str(run / "trees.jsonl")) == 1  # printed by rank 0 alone

    proc = torchrun("evaluate", config(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((run / "eval" / "results.json").read_text())
    want = json.loads((reference / "eval" / "results.json").read_text())
    assert got["per_question"] == want["per_question"]
    assert got == want
    assert sorted(p.name for p in (run / "eval" / "seeds").iterdir()) == \
        ["seed-0.json", "seed-1.json", "seed-2.json"]
    [stage] = [r for r in map(json.loads, open(run / "metrics.jsonl"))
               if r["stage"] == "evaluate"]
    # the untrained methods are one group (every seed in one engine run per method): rank 0's
    assert stage["world_size"] == 2 and [r["parts"] for r in stage["per_rank"]] == [3, 0]
    assert (run / "eval" / "report.md").is_file()
    assert proc.stdout.count("report:") == 1

    # everything done: a rerun on 2 ranks skips both stages and changes nothing
    proc = torchrun("evaluate", config(run))
    assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stderr[-3000:]
    assert json.loads((run / "eval" / "results.json").read_text()) == want


def test_dead_rank_resumes(setup, reference, tmp_path, torch_threads):  # noqa: F811
    _, config = setup
    run = tmp_path / "run"
    # rank 1 dies about to write its 4th tree: chunk 2 (questions 2, 3) is done, chunk 6 has
    # written question 6 of its 6 and 7; torchrun then stops rank 0 wherever it is
    proc = torchrun("expand", config(run), script=["tests/ranks_die.py"],
                    env={"MALT_TEST_DIE_RANK": "1", "MALT_TEST_DIE_AFTER": "3"})
    assert proc.returncode != 0
    part = run / "trees.rank-1.jsonl"
    left = [json.loads(x)["id"] for x in part.read_text().splitlines()]
    assert left == ["one-2", "one-3", "one-6"]
    assert not (run / "trees.jsonl").exists()  # not merged: the stage did not finish
    killed = [r["chunk"] for r in chunk_records(run) if r["rank"] == 1]
    assert killed == [2]
    other = tmp_path / "run-one-process"
    shutil.copytree(run, other)

    # the same command again, 2 ranks: rank 1 redoes only chunk 6 (writing question 7 alone)
    proc = torchrun("expand", config(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_trees(run, reference)
    counts = Counter(r["chunk"] for r in chunk_records(run))
    assert counts[2] == 1 and counts[6] == 1 and max(counts.values()) == 1, counts
    proc = torchrun("evaluate", config(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "eval" / "results.json").read_text()) == \
        json.loads((reference / "eval" / "results.json").read_text())

    # another number of ranks: one process picks up the parts the ranks left, and merges
    assert main(["expand", str(config(other))]) == 0
    same_trees(other, reference)
    counts = Counter(r["chunk"] for r in chunk_records(other))
    assert counts[2] == 1 and max(counts.values()) == 1, counts


def test_whole_run_on_two_ranks(setup, tmp_path, torch_threads):  # noqa: F811
    """`torchrun ... run`: expansion and evaluation across the ranks, credit and (without
    `deepspeed:`) training on rank 0 while rank 1 waits, the trained roles evaluated on both:
    every file equals one process's run. (With `deepspeed:` the ranks train together in the
    same processes: run by hand, docs/distributed.md; it takes ~85 s here.)"""
    from safetensors.torch import load_file

    _, config = setup
    over = ["--set", "train_questions=4", "--set", "credit.cut_replies=keep",
            "--set", "evaluate.seeds=[0,1]"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["run", str(config(ref)), *over]) == 0
    proc = torchrun("run", config(run), *over)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 prints
    assert (run / "trees.jsonl").read_bytes() == (ref / "trees.jsonl").read_bytes()
    for f in sorted((ref / "data").glob("*.jsonl")):
        assert (run / "data" / f.name).read_bytes() == f.read_bytes(), f.name
    for role in ("generator", "verifier", "refiner"):
        a, b = (load_file(d / "train" / "checkpoints" / role / "adapter_model.safetensors")
                for d in (run, ref))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), role
    got, want = (json.loads((d / "eval" / "results.json").read_text()) for d in (run, ref))
    assert "MALT" in got["methods"] and got == want
    records = [json.loads(x) for x in open(run / "metrics.jsonl")]
    stages = Counter(r["stage"] for r in records)
    assert stages["credit"] == stages["train"] == 1  # rank 0's records
    # one evaluate record per pipeline (SA/MA's chains, MALT's), with both ranks' counts
    evals = {r["method"]: r for r in records if r["stage"] == "evaluate"}
    assert sorted(evals) == ["MA", "MALT"] and stages["evaluate"] == 2
    ref_evals = {r["method"]: r for r in map(json.loads, open(ref / "metrics.jsonl"))
                 if r["stage"] == "evaluate"}
    for m, r in evals.items():
        assert r["world_size"] == 2 and 0 < r["prefill_tokens"] < r["context_tokens"]
        assert (r["context_tokens"], r["prefill_tokens"]) == (ref_evals[m]["context_tokens"],
                                                              ref_evals[m]["prefill_tokens"])
