"""What the README tells a user to run exists: commands, subcommands, configs and files."""

import re
from pathlib import Path

import pytest

from malt_fast.cli import build_parser, load_config
from malt_fast.pipeline import resolve

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_two_commands_and_ci_runs_the_second():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].startswith("bash scripts/setup.sh && .venv/bin/malt-fast ")
    assert (ROOT / ".ci" / "run").read_text().count(commands[1]) == 1


def test_every_malt_fast_subcommand_in_the_readme_exists():
    subcommands = build_parser()._subparsers._group_actions[0].choices
    used = set(re.findall(r"malt-fast (\w+)", README)) | set(
        re.findall(r"-m malt_fast\.cli (\w+)", README))
    assert used and used <= set(subcommands), used - set(subcommands)


def test_every_file_the_readme_names_exists():
    paths = set(re.findall(r"\b((?:configs|benchmarks|docs|scripts)/[\w./-]+\.(?:yaml|json|py|md|sh))",
                           README))
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert paths and not missing, missing


# named as well as globbed: a config that goes missing fails here instead of dropping out
SHIPPED = {"default.yaml", "tiny.yaml", "arith_100.yaml", "gsm8k.yaml", "math.yaml", "csqa.yaml",
           "llama8b.yaml", "llama8b-lowmem.yaml"}
CONFIGS = sorted(SHIPPED | {p.name for p in (ROOT / "configs").glob("*.yaml")} - {"prompts.yaml"})


@pytest.mark.parametrize("name", CONFIGS)
def test_run_configs_parse(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in a config (deepspeed: JSON files) are relative to the cwd
    cfg = resolve(load_config(ROOT / "configs" / name, []), name)
    if cfg["model"] is None:  # a packaged model: its dataset must be here and big enough
        from malt_fast.data import load_dataset

        kw = {"difficulty": cfg["difficulty"]} if cfg["dataset"] == "arith" else {}
        train = load_dataset(cfg["dataset"], cfg["train_split"], **kw)
        test = load_dataset(cfg["dataset"], cfg["test_split"], **kw)
        assert len(train) >= cfg["train_questions"], (len(train), cfg["train_questions"])
        assert len(test) >= cfg["evaluate"]["questions"]
        assert not {e.question for e in train} & {e.question for e in test}
