"""Role prompts: the three roles write into ONE chat transcript (docs/design.md, engines).

    [system, user(question), assistant(g), user(verifier instruction), assistant(v),
     user(refiner instruction), assistant(r)]

Each role's prompt is the transcript up to its own turn, so the verifier's prompt extends the
generator's and the refiner's extends the verifier's: the rollout engine reuses the KV cache of the
shorter prefix. The texts live in configs/prompts.yaml, one section per family.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from malt_fast.data.example import Example
from malt_fast.errors import MaltError, fail
from malt_fast.malt.answers import answer_family

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "configs" / "prompts.yaml"
# the line the generator's and refiner's instructions ask them to end with
ANSWER_MARKER = "Final Answer:"
FAMILIES = ("math", "multiple_choice")
_KEYS = ("system", "question", "verifier", "refiner")
_FIELDS = {"question": {"question", "choices"}, "system": set(), "verifier": set(),
           "refiner": set()}


@dataclass(frozen=True)
class RolePrompts:
    family: str
    system: str     # may be empty: then the transcript has no system message
    question: str   # the user's first turn: the generator's instruction with {question}[{choices}]
    verifier: str   # the user turn asking for a critique of the previous solution
    refiner: str    # the user turn asking for a corrected solution given the critique


def prompt_family(dataset: str, choices: dict | None = None) -> str:
    """'multiple_choice' for option questions, 'math' for everything with a computed answer."""
    return "multiple_choice" if answer_family(dataset, choices) == "choice" else "math"


def load_prompts(path=None, family: str = "math") -> RolePrompts:
    """Prompts of `family` ('math', 'multiple_choice', or a dataset name such as 'csqa') from the
    YAML file `path` (default configs/prompts.yaml)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    fam = family if family in FAMILIES else prompt_family(family)
    sections = _read_yaml(path)
    if fam not in sections:
        raise fail(path, f"no prompts for family {fam!r} (has: {', '.join(sorted(sections))})")
    return _parse_section(path, fam, sections[fam])


def load_all_prompts(path=None) -> dict[str, RolePrompts]:
    """Every family in the file, for runs that mix datasets."""
    path = Path(path) if path is not None else DEFAULT_PATH
    return {fam: _parse_section(path, fam, sec) for fam, sec in _read_yaml(path).items()}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise fail(path, "no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise fail(where, f"invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict) or not data:
        raise fail(path, "expected a mapping of prompt families (math, multiple_choice)")
    return data


def _parse_section(path: Path, family: str, section) -> RolePrompts:
    if not isinstance(section, dict):
        raise fail(path, f"{family}: expected a mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise fail(path, f"{family}.{unknown[0]}: unknown key (expected {', '.join(_KEYS)})")
    texts = {}
    for key in _KEYS:
        value = section.get(key)
        if not isinstance(value, str) or (key != "system" and not value.strip()):
            raise fail(path, f"{family}.{key}: missing or not a string")
        used = _placeholders(path, family, key, value)
        if not used <= _FIELDS[key]:
            allowed = ", ".join("{" + f + "}" for f in sorted(_FIELDS[key])) or "none"
            raise fail(path, f"{family}.{key}: unknown placeholder {{{sorted(used)[0]}}} "
                             f"(allowed: {allowed})")
        if key == "question" and "question" not in used:
            raise fail(path, f"{family}.question: must contain {{question}}")
        texts[key] = value.strip()
    return RolePrompts(family=family, **texts)


def _placeholders(path, family: str, key: str, text: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:  # a lone brace: literal braces must be doubled, {{ }}
        raise fail(path, f"{family}.{key}: bad template ({e})") from None


def question_text(example: Example, prompts: RolePrompts) -> str:
    """The user's first turn: the generator's instruction around the question (and options)."""
    choices = ""
    if "{choices}" in prompts.question:
        if not example.choices:
            raise MaltError(f"{example.id}: the {prompts.family} prompt needs answer choices")
        choices = "\n".join(f"{k}. {v}" for k, v in sorted(example.choices.items()))
    return prompts.question.format(question=example.question.strip(), choices=choices)


def generator_messages(example: Example, prompts: RolePrompts) -> list[dict]:
    """The transcript the generator continues: [system, user(question)]."""
    system = [{"role": "system", "content": prompts.system}] if prompts.system else []
    return system + [{"role": "user", "content": question_text(example, prompts)}]


def verifier_messages(example: Example, g: str, prompts: RolePrompts) -> list[dict]:
    """The generator's transcript + its solution `g` + the request for a critique."""
    return generator_messages(example, prompts) + [
        {"role": "assistant", "content": g},
        {"role": "user", "content": prompts.verifier}]


def refiner_messages(example: Example, g: str, v: str, prompts: RolePrompts) -> list[dict]:
    """The verifier's transcript + its critique `v` + the request for a corrected solution."""
    return verifier_messages(example, g, prompts) + [
        {"role": "assistant", "content": v},
        {"role": "user", "content": prompts.refiner}]
