"""`trees.jsonl`: one G->V->R tree per line (format in docs/design.md), read, validated and written.

A line is written only once its tree is complete and is flushed at once, so a killed expansion
loses at most the tree it was writing. What a kill can leave is a partial last line with no
newline; readers skip it (and say so), and the writer cuts it off before appending, so the next
tree starts on a clean line instead of being glued to the fragment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from malt_fast.errors import fail

LEVELS = ("generations", "verifications", "refinements")
_TOP = {"id": str, "dataset": str, "question": str, "gold": str, "choices": dict,
        "generations": list, "meta": dict}
_REQUIRED_TOP = ("id", "dataset", "question", "gold", "generations")
# per level: allowed fields and their types; "meta" is free-form for tools that need extra data.
# "finish" is why the reply ended (FINISHES; "length": cut by the token budget) and "tokens" how
# many tokens it generated; trees written before they were recorded lack both.
_REPLY = {"text": str, "finish": str, "tokens": int, "meta": dict}
_NODE = {
    "generations": {**_REPLY, "value": (int, float), "positive": bool,
                    "answer": (str, type(None)), "correct": bool, "verifications": list},
    "verifications": {**_REPLY, "value": (int, float), "positive": bool,
                      "verdict": (str, type(None)), "score": (int, float, type(None)),
                      "refinements": list},
    "refinements": {**_REPLY, "answer": (str, type(None)), "reward": int},
}
FINISHES = ("eos", "stop", "length")
_TYPE_NAMES = {str: "a string", dict: "an object", list: "a list", bool: "true/false",
               int: "an integer"}


def _report(msg: str) -> None:
    print(msg, file=sys.stderr)


def validate_tree(tree, where: str, n=None) -> None:
    """Raise a MaltError naming `where` (file:line) and the field if `tree` breaks the format.

    `n`: the expected branch count per level (int, or a (generations, verifications,
    refinements) triple); without it the counts must only agree within each level."""
    if not isinstance(tree, dict):
        raise fail(where, "expected a JSON object")
    _check_fields(tree, _TOP, _REQUIRED_TOP, where, "")
    if not tree["id"]:
        raise fail(where, "field 'id': empty")
    choices = tree.get("choices")
    if choices is not None and not all(isinstance(k, str) and isinstance(v, str)
                                       for k, v in choices.items()):
        raise fail(where, "field 'choices': expected an object of letter -> option text")
    expected = (n, n, n) if isinstance(n, int) else tuple(n) if n is not None else (None,) * 3
    _check_level(tree["generations"], 0, expected, where, "generations", {})


def _check_fields(obj: dict, schema: dict, required, where: str, prefix: str) -> None:
    for key in required:
        if key not in obj:
            raise fail(where, f"field '{prefix}{key}': missing")
    for key, value in obj.items():
        if key not in schema:
            raise fail(where, f"field '{prefix}{key}': unknown field")
        want = schema[key]
        wants = want if isinstance(want, tuple) else (want,)
        # JSON true/false are ints to Python; a bool where a number is expected is a type error
        ok = isinstance(value, wants) and not (isinstance(value, bool) and bool not in wants)
        if not ok:
            names = _type_name(wants)
            raise fail(where, f"field '{prefix}{key}': expected {names}, "
                              f"got {type(value).__name__}")


def _type_name(wants: tuple) -> str:
    if int in wants and float in wants:
        return "a number"
    return " or ".join(_TYPE_NAMES.get(w, "null") for w in wants)


def _check_level(nodes: list, depth: int, expected, where: str, path: str, seen: dict) -> None:
    level = LEVELS[depth]
    if not nodes:
        raise fail(where, f"field '{path}': no branches")
    want = expected[depth]
    if want is not None and len(nodes) != want:
        raise fail(where, f"field '{path}': expected {want} branches, got {len(nodes)}")
    if want is None:  # without an expected n, siblings across the tree must agree
        first = seen.setdefault(level, (len(nodes), path))
        if first[0] != len(nodes):
            raise fail(where, f"field '{path}': {len(nodes)} branches but '{first[1]}' has "
                              f"{first[0]} (inconsistent counts)")
    for i, node in enumerate(nodes):
        here = f"{path}[{i}]"
        if not isinstance(node, dict):
            raise fail(where, f"field '{here}': expected an object")
        child = LEVELS[depth + 1] if depth + 1 < len(LEVELS) else None
        required = ("text", child) if child else ()
        _check_fields(node, _NODE[level], required, where, here + ".")
        if node.get("finish", "eos") not in FINISHES:
            raise fail(where, f"field '{here}.finish': expected one of {', '.join(FINISHES)}, "
                              f"got {node['finish']!r}")
        if node.get("tokens", 0) < 0:
            raise fail(where, f"field '{here}.tokens': expected a count >= 0, got {node['tokens']}")
        if child:
            _check_level(node[child], depth + 1, expected, where, f"{here}.{child}", seen)
        elif "text" not in node and "reward" not in node:
            raise fail(where, f"field '{here}.text': missing (a leaf needs text or reward)")
        elif "reward" in node and node["reward"] not in (0, 1):
            raise fail(where, f"field '{here}.reward': expected 0 or 1, got {node['reward']}")


def _lines(path: Path, report):
    """(line number, parsed object) per non-blank line; a partial last line is skipped."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete_end = len(lines) - 1  # the last element is b"" when the file ends with a newline
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if no > complete_end:  # no newline after it: a write cut short by a kill
                report(f"{path}:{no}: ignoring a truncated last line (an interrupted write)")
                return
            raise fail(f"{path}:{no}", f"invalid JSON ({getattr(e, 'msg', e)})") from None
        yield no, obj


def read_trees(path, n=None, report=_report) -> list[dict]:
    """All trees in `path`, validated; ids must be unique. A truncated last line is reported
    through `report` and skipped, any other bad line is an error naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise fail(path, "no such file")
    trees, ids = [], {}
    for no, obj in _lines(path, report):
        where = f"{path}:{no}"
        validate_tree(obj, where, n)
        if obj["id"] in ids:
            first = ids[obj["id"]]
            raise fail(where, f"field 'id': duplicate {obj['id']!r} (first on line {first})")
        ids[obj["id"]] = no
        trees.append(obj)
    return trees


def finished_ids(path, report=_report) -> set[str]:
    """Ids of the complete trees in `path` (empty if it does not exist): what a resumed
    expansion skips."""
    path = Path(path)
    if not path.exists():
        return set()
    return {t["id"] for t in read_trees(path, report=report)}


class TreeWriter:
    """Append-only writer: one validated tree per line, flushed when written.

    Opening cuts off a partial last line left by a killed run, so appends start on a clean line."""

    def __init__(self, path, n=None, report=_report):
        self.path = Path(path)
        self.n = n
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_tail(self.path, report)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, tree: dict) -> None:
        validate_tree(tree, f"{self.path}:(new tree)", self.n)
        self._f.write(json.dumps(tree, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_partial_tail(path: Path, report) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        tail = data[keep:]
        try:  # a complete last line without its newline (hand-written): keep it, end the line
            json.loads(tail.decode("utf-8"))
            f.write(b"\n")
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        line_no = data.count(b"\n") + 1
        report(f"{path}:{line_no}: dropping a truncated last line "
               f"({len(tail)} bytes from an interrupted write)")
        f.truncate(keep)


def write_trees(path, trees: list[dict]) -> None:
    """Write all trees at once, atomically (a reader never sees half a file)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in trees))


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
