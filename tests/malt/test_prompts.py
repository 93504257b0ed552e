"""Role prompts: one shared transcript, YAML loading and its error messages."""

import pytest

from malt_fast.data.datasets import Example
from malt_fast.errors import MaltError
from malt_fast.malt.prompts import (DEFAULT_PATH, generator_messages, load_all_prompts,
                                    load_prompts, prompt_family, refiner_messages,
                                    verifier_messages)

MATH_EX = Example("gsm8k-test-0", "gsm8k", "  Tom has 3 apples and buys 2. How many?  ", "5")
MC_EX = Example("csqa-test-0", "csqa", "Where is money kept?", "A", {"B": "library", "A": "bank"})


def test_default_file_is_the_repo_config():
    assert DEFAULT_PATH.parts[-2:] == ("configs", "prompts.yaml") and DEFAULT_PATH.is_file()
    assert set(load_all_prompts()) == {"math", "multiple_choice"}


def test_transcript_nests_role_by_role():
    p = load_prompts(family="math")
    gen = generator_messages(MATH_EX, p)
    ver = verifier_messages(MATH_EX, "g text", p)
    ref = refiner_messages(MATH_EX, "g text", "v text", p)
    assert [m["role"] for m in ref] == ["system", "user", "assistant", "user", "assistant", "user"]
    # each role's prompt extends the previous one: the rollout engine shares these prefixes
    assert ver[:len(gen)] == gen and ref[:len(ver)] == ver
    assert ver[2] == {"role": "assistant", "content": "g text"}
    assert ref[4] == {"role": "assistant", "content": "v text"}
    assert gen[1]["content"].startswith("Tom has 3 apples and buys 2. How many?\n")
    assert 'Final Answer: <answer>' in gen[1]["content"]
    assert 'Final Answer: <answer>' in ref[5]["content"]
    assert "Do not write a new solution" in ver[3]["content"]


def test_multiple_choice_lists_sorted_options():
    p = load_prompts(family="csqa")  # a dataset name picks its family
    assert p.family == "multiple_choice"
    content = generator_messages(MC_EX, p)[-1]["content"]
    assert "Question: Where is money kept?\nOptions:\nA. bank\nB. library" in content
    assert "Final Answer: <letter>" in content
    with pytest.raises(MaltError,
                       match="gsm8k-test-0: the multiple_choice prompt needs answer choices"):
        generator_messages(MATH_EX, p)


def test_families():
    assert prompt_family("csqa") == "multiple_choice"
    assert prompt_family("math") == prompt_family("arith") == prompt_family("custom") == "math"
    assert prompt_family("custom", {"A": "x"}) == "multiple_choice"


def write(tmp_path, text):
    path = tmp_path / "prompts.yaml"
    path.write_text(text)
    return path


GOOD = 'math:\n  system: ""\n  question: "Q: {question}"\n  verifier: "check"\n  refiner: "fix"\n'


def test_custom_file_and_empty_system(tmp_path):
    p = load_prompts(write(tmp_path, GOOD), "math")
    # no system message at all when the system text is empty
    assert generator_messages(MATH_EX, p) == [
        {"role": "user", "content": "Q: Tom has 3 apples and buys 2. How many?"}]


@pytest.mark.parametrize("text,message", [
    (GOOD.replace('  refiner: "fix"\n', ""), "math.refiner: missing or not a string"),
    (GOOD.replace("{question}", "{question} {answer}"),
     r"math.question: unknown placeholder \{answer\} \(allowed: \{choices\}, \{question\}\)"),
    (GOOD.replace("{question}", "no slot"), r"math.question: must contain \{question\}"),
    (GOOD.replace('"check"', '"check {question}"'),
     r"math.verifier: unknown placeholder \{question\} \(allowed: none\)"),
    (GOOD + "  extra: x\n", "math.extra: unknown key"),
    (GOOD.replace("{question}", "{question"), "math.question: bad template"),
    ("math: [unclosed\n", "invalid YAML"),
    ("- a\n- b\n", "expected a mapping of prompt families"),
])
def test_bad_prompt_files(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(MaltError, match=rf"^{path}(:\d+)?: {message}"):
        load_prompts(path, "math")


def test_missing_family_and_file(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(MaltError, match=r"no prompts for family 'multiple_choice' \(has: math\)"):
        load_prompts(path, "csqa")
    with pytest.raises(MaltError, match="no such file"):
        load_prompts(tmp_path / "nope.yaml")
