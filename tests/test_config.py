"""The run config's schema (malt_fast/config.py) through the CLI: every mistake is one line naming
the file and the dotted field, exit status 2, in well under a second, before any model loads;
numbers in any YAML spelling, nested sections merged with their defaults, the nearest valid key
suggested; custom data needs splits that share no question; a tokenizer must fit its model;
docs/config.md is the schema's own rendering."""

import json
import time
from pathlib import Path

import pytest
import yaml

import malt_fast.model
import malt_fast.model.checkpoint
from malt_fast.cli import main
from malt_fast.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(malt_fast.model, "load_model", refuse)
    monkeypatch.setattr(malt_fast.model.checkpoint, "load_model", refuse)


def write(tmp_path, cfg, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(ids, split=None):
    return [{"id": i, "question": f"What is {k} plus 1?", "gold": str(k + 1),
             **({"split": split} if split else {})} for k, i in enumerate(ids)]


# (config, what the one-line error must say after "FILE: "); {tmp} is the test's directory
BAD = [
    ({"sampling": {"temperature": "hot"}}, "field 'sampling.temperature': expected a number, got 'hot'"),
    ({"engine": {"max_batch": "sixty"}}, "field 'engine.max_batch': expected an integer"),
    ({"engine": {"max_batch": 0}}, "field 'engine.max_batch': expected an integer >= 1, got 0"),
    ({"engine": {"cache_tokens": 1.5}}, "field 'engine.cache_tokens': expected an integer"),
    ({"sampling": {"max_new_tokens": {"generator": 0}}},
     "field 'sampling.max_new_tokens.generator': expected an integer >= 1"),
    ({"sampling": {"max_new_tokens": {"generater": 48}}},
     "unknown field 'sampling.max_new_tokens.generater' (did you mean 'generator'?)"),
    ({"sampling": {"top_p": 0}}, "field 'sampling.top_p': expected a number > 0"),
    ({"sampling": 5}, "field 'sampling': expected a mapping, got 5"),
    ({"train": {"sft_lrr": 1e-4}}, "unknown field 'train.sft_lrr' (did you mean 'sft_lr'?)"),
    ({"train": {"sft_lr": "fast"}}, "field 'train.sft_lr': expected a number, got 'fast'"),
    ({"train": {"lora": {"rank": 0}}}, "field 'train.lora.rank': expected an integer >= 1"),
    ({"train": {"lora": {"rnak": 4}}}, "unknown field 'train.lora.rnak' (did you mean 'rank'?)"),
    ({"train": {"roles": ["critic"]}},
     "field 'train.roles.0': expected generator, verifier, refiner or star, got 'critic'"),
    ({"train": {"finetune": "qlora"}}, "field 'train.finetune': expected lora or full"),
    ({"train": {"generator_dpo": 1}}, "field 'train.generator_dpo': expected true or false"),
    ({"train": {"beta": True}}, "field 'train.beta': expected a number, got a boolean"),
    ({"credit": {"theta": 1.5}}, "field 'credit.theta': expected a number < 1, got 1.5"),
    ({"credit": {"pairs": "some"}}, "field 'credit.pairs': expected all, max_k or one"),
    ({"credit": {"pairs": "max_k"}}, "field 'credit.max_pairs': pairs 'max_k' needs it"),
    ({"credit": {"cut_replies": "maybe"}}, "field 'credit.cut_replies': expected drop or keep"),
    ({"rounds": 3, "credit": {"theta_schedule": [0.5, 0.6]}},
     "field 'credit.theta_schedule': has 2 thresholds, rounds is 3"),
    ({"evaluate": {"seeds": []}}, "field 'evaluate.seeds': expected a non-empty list"),
    ({"evaluate": {"seeds": [1, 1]}}, "field 'evaluate.seeds': expected a non-empty list of "
                                      "distinct integers"),
    ({"evaluate": {"star": "yes"}}, "field 'evaluate.star': expected true or false, got 'yes'"),
    ({"evaluate": {"questions": -1}}, "field 'evaluate.questions': expected an integer >= 1"),
    ({"dtype": "float64"}, "field 'dtype': expected float32, bfloat16, float16 or auto"),
    ({"device": "gpu"}, "field 'device': expected auto, cpu, cuda or cuda:N"),
    ({"n": 0}, "field 'n': expected an integer >= 1, got 0"),
    ({"threads": -2}, "field 'threads': expected an integer >= 0"),
    ({"modle": "x"}, "unknown field 'modle' (did you mean 'model'?)"),
    ({"deepspeed": {"config": "ds.json", "nproc": 0}},
     "field 'deepspeed.nproc': expected an integer >= 1"),
    ({"deepspeed": {"config": "ds.json", "stage": 3}}, "unknown field 'deepspeed.stage'"),
    ({"model": "{tmp}/no-model"}, "field 'model': {tmp}/no-model is not a Hugging Face model "
                                  "directory"),
    ({"tokenizer": "{tmp}"}, "field 'tokenizer': {tmp} has no tokenizer.json"),
    ({"dataset": "{tmp}/missing.jsonl"}, "field 'dataset': {tmp}/missing.jsonl: no such file"),
    ({"dataset": "{tmp}/nosplit.jsonl"}, "field 'dataset': {tmp}/nosplit.jsonl:1: no 'split' "
                                         "field"),
    ({"dataset": {"train": "{tmp}/a.jsonl", "test": "{tmp}/b.jsonl"}},
     "field 'dataset': 1 question ids are in both the training and the test split (e.g. 'q2')"),
    ({"dataset": {"train": "{tmp}/a.jsonl"}}, "field 'dataset.test': missing"),
    ({"prompts": "{tmp}/none.yaml"}, "field 'prompts': {tmp}/none.yaml: no such file"),
]


@pytest.mark.parametrize("cfg, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, no_model_load, cfg, message):
    jsonl(tmp_path / "nosplit.jsonl", rows(["q1", "q2"]))
    jsonl(tmp_path / "a.jsonl", rows(["q1", "q2"]))
    jsonl(tmp_path / "b.jsonl", rows(["q2", "q3"]))
    (tmp_path / "no-model").mkdir()
    text = yaml.safe_dump(cfg).replace("{tmp}", str(tmp_path))
    path = write(tmp_path, text)
    t0 = time.perf_counter()
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert err.startswith(f"malt-fast: error: {path}: ") and err.count("\n") == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert took < 5, f"{took:.1f} s to reject a config"
    assert not (tmp_path / "run").exists()  # nothing started


def test_yaml_and_cli_mistakes(tmp_path, capsys, no_model_load):
    for text, message in [("train: [1, 2\n", "invalid YAML"),
                          ("- 1\n- 2\n", "expected a mapping of fields at the top level")]:
        path = write(tmp_path, text)
        assert main(["check", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"malt-fast: error: {path}: {message}") and err.count("\n") == 1
    path = write(tmp_path, {"n": 2})
    assert main(["check", str(path), "--set", "n"]) == 2
    assert "--set n: expected key=value" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: no such config file" in capsys.readouterr().err


def test_numbers_in_any_spelling_and_nested_defaults(tmp_path, capsys, no_model_load):
    """PyYAML reads 5e-5 as a string; nested sections keep the defaults they do not set."""
    path = write(tmp_path, "train: {sft_lr: 5e-5, dpo_lr: 1.0e-6}\n"
                           "sampling: {max_new_tokens: {generator: 48}, temperature: .7}\n"
                           "engine: {max_batch: '64'}\n")
    assert main(["check", str(path), "--set", "train.beta=1e-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {path}: OK (")
    cfg = yaml.safe_load(out)
    assert cfg["train"]["sft_lr"] == 5e-5 and cfg["train"]["dpo_lr"] == 1e-6
    assert cfg["train"]["beta"] == 0.1 and cfg["engine"]["max_batch"] == 64
    assert cfg["sampling"]["temperature"] == 0.7
    assert cfg["sampling"]["max_new_tokens"] == {"generator": 48, "verifier": 128,
                                                 "refiner": 160}
    assert Path(cfg["model"]).suffix == ".gguf" and Path(cfg["prompts"]).is_file()


def test_check_takes_seconds_and_loads_no_weights(tmp_path, capsys, no_model_load):
    for name in ("default.yaml", "arith_100.yaml", "gsm8k.yaml", "csqa.yaml", "math.yaml",
                 "tiny.yaml"):
        t0 = time.perf_counter()
        assert main(["check", str(ROOT / "configs" / name)]) == 0, capsys.readouterr().err
        assert time.perf_counter() - t0 < 10
        capsys.readouterr()


def test_custom_data_with_split_fields(tmp_path, capsys, no_model_load):
    data = jsonl(tmp_path / "d.jsonl", rows(["a", "b"], "train") + rows(["c"], "test"))
    path = write(tmp_path, {"dataset": str(data), "train_questions": 2})
    assert main(["check", str(path)]) == 0
    assert "(2 training and 1 test questions" in capsys.readouterr().out
    from malt_fast.data import load_dataset

    assert [e.id for e in load_dataset(data, "test")] == ["c"]
    assert len(load_dataset(data)) == 3  # no split asked: the whole file (library use)


def test_a_tokenizer_that_does_not_fit_the_model_stops_at_load(tmp_path, capsys):
    """A model whose vocabulary is smaller than its tokenizer's (e.g. a tokenizer of another
    model): one line at load, before any token reaches the embedding."""
    from malt_fast.model import save_model
    from malt_fast.model.llama import Llama, LlamaConfig

    save_model(Llama(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1)), tmp_path / "small")
    from malt_fast.data import smollm2_gguf

    path = write(tmp_path, {"model": str(tmp_path / "small"), "tokenizer": str(smollm2_gguf()),
                            "train_questions": 1, "run_dir": str(tmp_path / "run")})
    assert main(["expand", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(smollm2_gguf()) in err
    assert "outside the model's vocabulary of 1000" in err and "does not belong" in err


def test_docs_config_reference_is_generated_from_the_schema():
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), \
        "regenerate it: python -m malt_fast.config > docs/config.md"
