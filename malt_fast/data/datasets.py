"""Dataset loaders: one record type for GSM8K, MATH, CommonsenseQA and the small math sets.

`load_dataset(name, split)` reads the packaged copies; `load_dataset(path, split)` reads a user's
JSONL file in any of the same formats (or the native one: id, question, gold[, choices]) whose
rows say which split they belong to (`"split": "train"`); `load_split({"train": FILE, "test":
FILE}, "test")` reads one of two files. `check_disjoint` refuses a test split that shares question
ids with the training split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from malt_fast.data.assets import DATA_PACKAGES, packaged_file
from malt_fast.data.example import Example
from malt_fast.data.synthetic import make_arith
from malt_fast.data.text import last_boxed, normalize_number
from malt_fast.errors import MaltError, fail

SPLITS = {
    "gsm8k": ("train", "test"), "math": ("train", "test"),
    # the only CommonsenseQA split packaged is dev (1,221 rows); train/test are its even/odd rows
    "csqa": ("validation", "train", "test"),
    "svamp": ("test",), "asdiv": ("test",), "mawps": ("test",),
    "arith": ("train", "test"),  # generated (malt_fast.data.synthetic), not read from a file
}
MATH_FAMILY = {"gsm8k", "math", "svamp", "asdiv", "mawps", "arith"}
ARITH_SIZES = {"train": 5000, "test": 1000}
_OPTION = re.compile(r"^\s*([A-E])[.)]\s*(.+?)\s*$")


def load_dataset(name, split: str | None = None, *, difficulty: int = 1,
                 seed: int = 0) -> list[Example]:
    """Packaged dataset `name` in {gsm8k, math, csqa, svamp, asdiv, mawps} or the generated
    `arith` (with `difficulty` and `seed`) at `split`, or a JSONL path: its rows whose `split`
    field is `split` (every row when `split` is None)."""
    name_s = str(name)
    if name_s in SPLITS:
        split = split or SPLITS[name_s][-1]
        if split not in SPLITS[name_s]:
            raise MaltError(f"{name_s}: no split {split!r} (available: {', '.join(SPLITS[name_s])})")
        if name_s == "arith":
            return make_arith(ARITH_SIZES[split], split, difficulty, seed)
        dist, rel = DATA_PACKAGES[name_s]
        path = packaged_file(dist, rel.format(split=split))
        rows = read_jsonl(path)
        if name_s == "asdiv":  # a few ASDiv answers are names or ratios: keep the numeric ones
            rows = [(ln, r) for ln, r in rows
                    if normalize_number(str(r.get("answer", "")).split("(")[0]) is not None]
        if name_s == "math":  # two MATH train solutions end in an empty \boxed{}: no gold, dropped
            rows = [(ln, r) for ln, r in rows if (last_boxed(r.get("solution", "")) or "").strip()]
        if name_s == "csqa" and split != "validation":
            rows = rows[0::2] if split == "train" else rows[1::2]
        return [parse_row(row, name_s, f"{name_s}-{split}-{i}", path, line)
                for i, (line, row) in enumerate(rows)]
    path = Path(name_s)
    if not path.suffix == ".jsonl" and not path.exists():
        raise MaltError(f"{name_s}: unknown dataset (packaged: {', '.join(SPLITS)}; "
                        "or a path to a .jsonl file)")
    if not path.is_file():
        raise fail(path, "no such file")
    rows = read_jsonl(path)
    if not rows:
        raise fail(path, "no rows")
    if split is not None:
        rows = rows_of_split(rows, split, path)
    return [parse_row(row, detect_format(row, path, line), f"{path.stem}-{i}", path, line)
            for i, (line, row) in enumerate(rows)]


def rows_of_split(rows: list[tuple[int, dict]], split: str, path) -> list[tuple[int, dict]]:
    """The rows whose `split` field is `split`; every row must have one (a file read whole as
    both the training and the test split would evaluate on trained questions)."""
    unmarked = next((line for line, row in rows if "split" not in row), None)
    if unmarked is not None:
        raise fail(f"{path}:{unmarked}", "no 'split' field; give every row \"split\": \"train\" "
                                         "or \"test\", or name one file per split (dataset: "
                                         "{train: FILE, test: FILE})")
    picked = [(line, row) for line, row in rows if row["split"] == split]
    if not picked:
        found = sorted({str(row["split"]) for _, row in rows})
        raise fail(path, f"no rows of split {split!r} (splits here: {', '.join(found)})")
    return picked


def load_split(dataset, split: str, *, difficulty: int = 1, seed: int = 0) -> list[Example]:
    """`dataset` (a packaged name, a JSONL path with split fields, or {split: file}) at
    `split`; a {split: file} file is read whole."""
    if isinstance(dataset, dict):
        if split not in dataset:
            raise MaltError(f"dataset: no file for split {split!r} (given: "
                            f"{', '.join(dataset)})")
        return load_dataset(dataset[split], None)
    return load_dataset(dataset, split, difficulty=difficulty, seed=seed)


def check_disjoint(train: list[Example], test: list[Example], where) -> None:
    """A test question must not be a training question: ids shared by the splits are an error."""
    shared = sorted({e.id for e in train} & {e.id for e in test})
    if shared:
        raise fail(where, f"{len(shared)} question ids are in both the training and the test "
                          f"split (e.g. {shared[0]!r}): evaluation would include trained "
                          "questions")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line fails naming the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(f"{path}:{line_no}", f"invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise fail(f"{path}:{line_no}", "expected a JSON object")
            rows.append((line_no, row))
    return rows


def detect_format(row: dict, path: Path, line: int) -> str:
    if "gold" in row and "question" in row:
        return "native"
    if "problem" in row and "solution" in row:
        return "math"
    if "question" in row and "options" in row and "answer" in row:
        return "csqa"
    if "question" in row and "answer" in row:
        return "gsm8k"
    raise fail(f"{path}:{line}", "unrecognised row: expected fields question+gold, "
                                 "question+answer (GSM8K), problem+solution (MATH) or "
                                 "question+answer+options (CommonsenseQA)")


def _field(row: dict, key: str, path, line: int):
    if key not in row or row[key] is None:
        raise fail(f"{path}:{line}", f"missing field {key!r}")
    return row[key]


def _number(value, path, line, key) -> str:
    gold = normalize_number(str(value).split("(")[0])
    if gold is None:
        raise fail(f"{path}:{line}", f"field {key!r} is not a number: {str(value)[:60]!r}")
    return gold


def parse_row(row: dict, fmt: str, default_id: str, path, line: int) -> Example:
    get = lambda key: _field(row, key, path, line)  # noqa: E731
    if fmt == "native":
        choices = row.get("choices")
        dataset = row.get("dataset", "custom")
        return Example(str(row.get("id", default_id)), dataset, str(get("question")),
                       str(get("gold")), dict(choices) if choices else None)
    if fmt == "gsm8k":
        answer = str(get("answer"))
        if "####" not in answer:
            raise fail(f"{path}:{line}", "GSM8K answer has no '####' line")
        return Example(default_id, "gsm8k", get("question"),
                       _number(answer.rsplit("####", 1)[1], path, line, "answer"))
    if fmt == "math":
        gold = last_boxed(get("solution"))
        if not (gold or "").strip():
            raise fail(f"{path}:{line}", "MATH solution has no \\boxed{} answer")
        return Example(default_id, "math", get("problem"), gold.strip())
    if fmt == "csqa":
        # one packaged row has its first options inside the question text: collect them from both
        question_lines, choices = [], {}
        for text in (str(get("question")), str(get("options"))):
            for opt in text.strip().splitlines():
                m = _OPTION.match(opt)
                if m:
                    choices[m.group(1)] = m.group(2)
                elif not choices:
                    question_lines.append(opt)
        letter = str(get("answer")).strip()[:1]
        if len(choices) < 2 or letter not in choices:
            raise fail(f"{path}:{line}", "CommonsenseQA row needs options A-E and an answer letter")
        return Example(default_id, "csqa", "\n".join(question_lines).strip(), letter, choices)
    if fmt == "svamp":
        question = f"{get('Body').strip()} {get('Question').strip()}"
        return Example(default_id, "svamp", question, _number(get("Answer"), path, line, "Answer"))
    if fmt == "asdiv":
        question = f"{get('body').strip()} {get('question').strip()}"
        return Example(default_id, "asdiv", question, _number(get("answer"), path, line, "answer"))
    if fmt == "mawps":
        return Example(default_id, "mawps", get("input"), _number(get("target"), path, line, "target"))
    raise MaltError(f"{path}: unknown format {fmt}")
