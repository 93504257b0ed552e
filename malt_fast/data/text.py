"""Small text utilities shared by the loaders (gold answers) and the reward functions."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), braces balanced."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    if boxed < 0 and fbox < 0:
        return None
    i = boxed + len("\\boxed") if boxed > fbox else fbox + len("\\fbox")
    if text.startswith(" ", i):  # "\boxed 5": up to the next space or dollar sign
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if not text.startswith("{", i):
        return None
    end = balanced_end(text, i)
    return text[i + 1:end - 1] if end > 0 else None


def balanced_end(s: str, i: int) -> int:
    """Index just past the brace group that opens at s[i] == '{', or -1 if unbalanced."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return -1


def normalize_number(s: str) -> str | None:
    """'1,000.50' -> '1000.5', '$18' -> '18', '7.0' -> '7'; None if `s` is not a number."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    if not _NUMBER.match(s):
        return None
    if "e" in s.lower():
        s = format(float(s), "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("+")
    if s in ("", "-", "-0"):
        return "0"
    neg = s.startswith("-")
    digits = s[1:] if neg else s
    digits = digits.lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return ("-" if neg else "") + digits
