"""trees.jsonl: validation messages, append-only writer, resume after a killed write."""

import json

import pytest

from malt_fast.errors import MaltError
from malt_fast.malt.trees import TreeWriter, finished_ids, read_trees, validate_tree


def tree(tid="q-0", n=2):
    return {"id": tid, "dataset": "gsm8k", "question": "What is 1+1?", "gold": "2",
            "generations": [{"text": f"g{i}", "verifications": [
                {"text": f"g{i}v{j}", "refinements": [{"text": f"Final Answer: {k}"}
                                                      for k in range(n)]}
                for j in range(n)]} for i in range(n)]}


def error_of(obj, n=None) -> str:
    with pytest.raises(MaltError) as info:
        validate_tree(obj, "trees.jsonl:7", n)
    return str(info.value)


def test_valid_trees_pass():
    validate_tree(tree(n=2), "f:1")
    validate_tree(tree(n=3), "f:1", n=3)
    validate_tree(tree(n=3), "f:1", n=(3, 3, 3))


def test_missing_field_names_file_line_and_field():
    t = tree()
    del t["generations"][1]["verifications"][0]["text"]
    assert error_of(t) == ("trees.jsonl:7: field 'generations[1].verifications[0].text': "
                           "missing")
    t = tree()
    del t["gold"]
    assert error_of(t) == "trees.jsonl:7: field 'gold': missing"


def test_wrong_types_and_values():
    t = tree()
    t["gold"] = 2
    assert error_of(t) == "trees.jsonl:7: field 'gold': expected a string, got int"
    t = tree()
    t["generations"][0]["verifications"][1]["refinements"][0]["reward"] = 2
    assert "'generations[0].verifications[1].refinements[0].reward': expected 0 or 1" in error_of(t)
    t = tree()
    t["generations"][0]["value"] = True
    assert "'generations[0].value': expected a number, got bool" in error_of(t)
    t = tree()
    t["generations"][0]["verifications"] = {}
    assert "'generations[0].verifications': expected a list, got dict" in error_of(t)


def test_unknown_field_is_an_error():
    t = tree()
    t["generations"][0]["score"] = 1
    assert error_of(t) == "trees.jsonl:7: field 'generations[0].score': unknown field"


def test_branch_counts():
    assert error_of(tree(n=2), n=3) == \
        "trees.jsonl:7: field 'generations': expected 3 branches, got 2"
    t = tree(n=2)
    t["generations"][1]["verifications"][1]["refinements"].pop()
    assert error_of(t) == ("trees.jsonl:7: field 'generations[1].verifications[1].refinements': "
                           "1 branches but 'generations[0].verifications[0].refinements' has 2 "
                           "(inconsistent counts)")
    t = tree(n=2)
    t["generations"][0]["verifications"] = []
    assert "'generations[0].verifications': no branches" in error_of(t)


def test_leaf_needs_text_or_reward():
    t = tree()
    t["generations"][0]["verifications"][0]["refinements"][1] = {"answer": "2"}
    assert "refinements[1].text': missing (a leaf needs text or reward)" in error_of(t)
    t["generations"][0]["verifications"][0]["refinements"][1] = {"reward": 1}
    validate_tree(t, "f:1")


def test_reader_names_the_bad_line(tmp_path):
    path = tmp_path / "trees.jsonl"
    path.write_text(json.dumps(tree("a")) + "\n{not json\n" + json.dumps(tree("b")) + "\n")
    with pytest.raises(MaltError, match=rf"^{path}:2: invalid JSON"):
        read_trees(path)
    path.write_text(json.dumps(tree("a")) + "\n\n" + json.dumps(tree("a")) + "\n")
    with pytest.raises(MaltError,
                       match=rf"^{path}:3: field 'id': duplicate 'a' \(first on line 1\)"):
        read_trees(path)
    with pytest.raises(MaltError, match="no such file"):
        read_trees(tmp_path / "missing.jsonl")


def test_writer_appends_and_resume_skips_finished(tmp_path):
    path = tmp_path / "run" / "trees.jsonl"
    assert finished_ids(path) == set()
    with TreeWriter(path, n=2) as w:
        w.write(tree("a"))
        # flushed per line: a reader sees it while the writer is still open
        assert finished_ids(path) == {"a"}
        w.write(tree("b"))
    with TreeWriter(path, n=2) as w:
        w.write(tree("c"))
    assert [t["id"] for t in read_trees(path, n=2)] == ["a", "b", "c"]


def test_writer_refuses_a_bad_tree(tmp_path):
    path = tmp_path / "trees.jsonl"
    with TreeWriter(path, n=3) as w, pytest.raises(MaltError, match="expected 3 branches"):
        w.write(tree("a", n=2))
    assert path.read_text() == ""


def test_truncated_last_line_is_reported_skipped_and_cut(tmp_path):
    path = tmp_path / "trees.jsonl"
    full = json.dumps(tree("a")) + "\n" + json.dumps(tree("b")) + "\n"
    partial = json.dumps(tree("c"))[:57]  # a kill in the middle of writing tree c
    path.write_text(full + partial)
    reports = []
    assert finished_ids(path, report=reports.append) == {"a", "b"}
    assert reports == [f"{path}:3: ignoring a truncated last line (an interrupted write)"]
    reports.clear()
    with TreeWriter(path, report=reports.append) as w:
        w.write(tree("c"))
    assert reports == [f"{path}:3: dropping a truncated last line (57 bytes from an "
                       "interrupted write)"]
    assert path.read_text() == full + json.dumps(tree("c")) + "\n"
    assert [t["id"] for t in read_trees(path)] == ["a", "b", "c"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "trees.jsonl"
    path.write_text(json.dumps(tree("a")))  # hand-written, no final newline
    assert finished_ids(path) == {"a"}
    with TreeWriter(path) as w:
        w.write(tree("b"))
    assert [t["id"] for t in read_trees(path)] == ["a", "b"]


def test_finish_and_tokens_are_checked():
    t = tree()
    t["generations"][0]["finish"] = "length"
    t["generations"][0]["tokens"] = 48
    validate_tree(t, "f:1")
    t["generations"][1]["verifications"][0]["finish"] = "timeout"
    assert error_of(t) == ("trees.jsonl:7: field 'generations[1].verifications[0].finish': "
                           "expected one of eos, stop, length, got 'timeout'")
    t = tree()
    t["generations"][0]["verifications"][0]["refinements"][1]["tokens"] = -1
    assert "'generations[0].verifications[0].refinements[1].tokens': expected a count >= 0" \
        in error_of(t)
    t["generations"][0]["verifications"][0]["refinements"][1]["tokens"] = "12"
    assert "refinements[1].tokens': expected an integer, got str" in error_of(t)
