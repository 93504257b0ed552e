"""Answer extraction `T` and reward `R` for the three dataset families.

    number  (gsm8k, svamp, asdiv, mawps, arith): a number, compared exactly as a rational
    math    (math, and any dataset not named here): a LaTeX answer, compared by normalised string,
            then by a restricted parser + numeric evaluation (never `eval`)
    choice  (csqa, or any example with `choices`): an option letter A-E

Model output is untrusted. Nothing here executes it: the only interpretation is a hand-written
recursive-descent parser over a fixed grammar, with limits on length, nesting, exponent size and
factorials, so one check takes microseconds to milliseconds whatever the input. See docs/malt.md.
"""

from __future__ import annotations

import cmath
import math
import random
import re
from fractions import Fraction
from itertools import permutations

from malt_fast.data.text import balanced_end, normalize_number

NUMBER_DATASETS = frozenset({"gsm8k", "svamp", "asdiv", "mawps", "arith"})
CHOICE_DATASETS = frozenset({"csqa"})


def answer_family(dataset: str, choices: dict | None = None) -> str:
    """'choice', 'number' or 'math'. Unknown datasets use 'math', whose grader also accepts plain
    numbers, so a user's JSONL set of numeric questions is still graded sensibly."""
    if choices or dataset in CHOICE_DATASETS:
        return "choice"
    if dataset in NUMBER_DATASETS:
        return "number"
    return "math"


def extract_answer(text: str, dataset: str, choices: dict | None = None) -> str | None:
    """T: the final answer in a model's output (normalised number, LaTeX string or letter)."""
    if not isinstance(text, str):
        return None
    family = answer_family(dataset, choices)
    if family == "number":
        return _extract_number_answer(text)
    if family == "choice":
        return _extract_choice(text, choices or {})
    return _extract_math_answer(text)


def answers_equal(answer: str | None, gold: str, dataset: str, choices: dict | None = None) -> bool:
    """Whether an extracted answer equals the gold answer under the dataset's equivalence."""
    if answer is None or gold is None:
        return False
    family = answer_family(dataset, choices)
    if family == "choice":
        return answer == _gold_letter(str(gold), choices or {})
    if family == "number":
        a, g = _as_fraction(answer), _as_fraction(normalize_number(str(gold)) or "")
        if a is not None and g is not None:
            return a == g
    return math_equal(answer, str(gold))


def is_correct(text: str, gold: str, dataset: str, choices: dict | None = None) -> bool:
    """Whether the final answer in `text` (a model output) equals `gold`."""
    return answers_equal(extract_answer(text, dataset, choices), gold, dataset, choices)


def reward(text: str, gold: str, dataset: str, choices: dict | None = None) -> int:
    """R: 1 if the output's final answer is right, else 0."""
    return int(is_correct(text, gold, dataset, choices))


# ---------------------------------------------------------------------------------------------
# where the answer is: "Final Answer:" line, \boxed{}, "the answer is", then fallbacks

_FINAL = re.compile(r"final\s+answer\s*(?:is\b)?\s*[:：]?", re.I)
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:|=)\s*[:]?", re.I)
# "\$" inside math is a dollar sign, not a delimiter ("$\$42$")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$((?:\\\$|[^$])+?)(?<!\\)\$"
                        r"|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)


def _segments_after(pattern: re.Pattern, text: str) -> list[str]:
    """The rest of the line after each match, last match first (the answer usually comes last).
    A label alone on its line ("Final Answer:\\n72") takes the next non-empty line."""
    out = []
    for m in reversed(list(pattern.finditer(text))):
        lines = text[m.end():].split("\n")
        seg = _strip_decor(lines[0])
        if not seg:
            seg = next((_strip_decor(ln) for ln in lines[1:] if _strip_decor(ln)), "")
        if seg:
            out.append(seg)
    return out


def _strip_decor(s: str) -> str:
    """Markdown emphasis, headings and a closing full stop are not part of an answer."""
    return s.strip().strip("*# \t").strip().rstrip(".").rstrip()


def _math_spans(s: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(s)]


_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def last_boxed(text: str) -> str | None:
    """Content of the last top-level \\boxed{...} (or \\fbox, or '\\boxed 5'), braces balanced.
    Unlike data.text.last_boxed (which finds the last box anywhere), a box nested inside another
    box belongs to the outer answer: '\\boxed{\\frac{\\boxed{1}}{2}}' answers
    '\\frac{\\boxed{1}}{2}'."""
    found, i = None, 0
    while True:
        m = _BOX.search(text, i)
        if not m:
            return found
        j = m.end()
        if text.startswith("{", j):
            end = balanced_end(text, j)
            if end < 0:
                return found  # unbalanced: the model was cut off inside its box
            found, i = text[j + 1:end - 1], end
        else:
            bare = re.match(r" +([^\s$]+)", text[j:])
            if bare:
                found = bare.group(1)
            i = j


# ---------------------------------------------------------------------------------------------
# number family

# A minus sign counts only where it cannot be subtraction ("10-5" is 5, " -5" is -5); thousands
# commas only in groups of three so "1,2,3" stays three numbers.
_NUM = re.compile(r"(?<![\w.])(-\s?)?\$?\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
                  r"(?:\s*/\s*(\d+)(?![\d.,]))?")


def _numbers(s: str) -> list[str]:
    out = []
    for m in _NUM.finditer(s):
        num = normalize_number(("-" if m.group(1) else "") + m.group(2))
        if num is None:
            continue
        if m.group(3) is not None:  # "3/4": keep the fraction, exactly
            den = int(m.group(3))
            if den == 0:
                continue
            num = _format_fraction(Fraction(num) / den)
        out.append(num)
    return out


def _format_fraction(f: Fraction) -> str:
    if f.denominator == 1:
        return str(f.numerator)
    d = f.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return str(f)
    places = 0  # a terminating decimal reads better than p/q; found exactly, not via float
    while (f * 10 ** places).denominator != 1:
        places += 1
    digits = str(abs(f.numerator * 10 ** places // f.denominator)).rjust(places + 1, "0")
    return ("-" if f < 0 else "") + digits[:-places] + "." + digits[-places:]


def _number_in_segment(seg: str) -> str | None:
    """The number a conclusion line states. After the last '=' ("18 - 5 = 13"), else the first
    number ("13 apples (18 - 5)"); a boxed value wins over both."""
    boxed = last_boxed(seg)
    if boxed is not None:
        nums = _numbers(_latex_to_plain(boxed))
        if nums:
            return nums[0]
    seg = _latex_to_plain(seg)
    tail = seg.rsplit("=", 1)[-1]
    nums = _numbers(tail) or _numbers(seg)
    return nums[0] if nums else None


def _latex_to_plain(s: str) -> str:
    """\\frac{a}{b} -> a/b and LaTeX thousands '{,}' -> ',', so numeric answers in LaTeX parse."""
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\$", "$").replace("\\%", "%")
    return re.sub(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}", r"\1/\2", s)


def _extract_number_answer(text: str) -> str | None:
    for seg in _segments_after(_FINAL, text):
        num = _number_in_segment(seg)
        if num is not None:
            return num
    boxed = last_boxed(text)
    if boxed is not None:
        nums = _numbers(_latex_to_plain(boxed))
        if nums:
            return nums[-1]
    for seg in _segments_after(_ANSWER_IS, text):
        num = _number_in_segment(seg)
        if num is not None:
            return num
    nums = _numbers(_latex_to_plain(text))
    return nums[-1] if nums else None


def _as_fraction(s: str | None) -> Fraction | None:
    if not s or len(s) > 200 or not re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------------------------------------
# choice family

def _gold_letter(gold: str, choices: dict) -> str:
    g = gold.strip()
    if len(g) == 1:
        return g.upper()
    for letter, opt in choices.items():  # a gold written as the option text
        if opt.strip().lower() == g.lower():
            return letter
    return g


def _choice_in_segment(seg: str, choices: dict) -> str | None:
    """Letter in a conclusion: 'B', '(B)', 'B) bank', 'bank', 'option B'."""
    letters = "".join(sorted(choices)) or "ABCDE"
    boxed = last_boxed(seg)
    s = _strip_decor(boxed if boxed is not None else seg).strip("$ ")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    m = re.fullmatch(rf"(?:option\s+|choice\s+)?[(\[]?([{letters}])[)\]]?[.:]?", s, re.I)
    if m:
        return m.group(1).upper()
    m = re.search(rf"[(\[]([{letters}])[)\]]|(?<![\w'])([{letters}])[).:](?!\w)|"
                  rf"\b(?:option|choice)\s+([{letters}])\b", s)
    if m:
        return next(g for g in m.groups() if g)
    found = _option_text_in(s, choices)
    if found:
        return found
    # A bare capital is a letter, except "A" used as the article ("A bank")
    m = re.search(rf"(?<![\w'])([{letters.replace('A', '')}]|A(?!\s+[a-z]))(?![\w'])", s)
    return m.group(1) if m else None


def _option_text_in(s: str, choices: dict) -> str | None:
    """The option whose text the segment names; the longest match wins so 'department store'
    beats 'store', and a tie between different options is no answer."""
    low = s.lower()
    hits = [(len(opt), letter) for letter, opt in choices.items()
            if opt.strip() and re.search(rf"(?<!\w){re.escape(opt.strip().lower())}(?!\w)", low)]
    if not hits:
        return None
    hits.sort(reverse=True)
    if len(hits) > 1 and hits[0][0] == hits[1][0]:
        return None
    return hits[0][1]


def _extract_choice(text: str, choices: dict) -> str | None:
    for seg in _segments_after(_FINAL, text) + _segments_after(_ANSWER_IS, text):
        letter = _choice_in_segment(seg, choices)
        if letter:
            return letter
    boxed = last_boxed(text)
    if boxed is not None:
        letter = _choice_in_segment(boxed, choices)
        if letter:
            return letter
    lines = [ln for ln in text.strip().split("\n") if ln.strip()]
    return _choice_in_segment(lines[-1], choices) if lines else None


# ---------------------------------------------------------------------------------------------
# math family: extraction

def _extract_math_answer(text: str) -> str | None:
    for seg in _segments_after(_FINAL, text):
        ans = _math_in_segment(seg)
        if ans:
            return ans
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for seg in _segments_after(_ANSWER_IS, text):
        ans = _math_in_segment(seg)
        if ans:
            return ans
    stripped = text.strip()
    if stripped and "\n" not in stripped and len(stripped) <= 200 and not _has_word(stripped):
        return _math_in_segment(stripped)  # the whole output is a bare answer ("\frac12")
    nums = _numbers(_latex_to_plain(text))
    return nums[-1] if nums else None


def _math_in_segment(seg: str) -> str | None:
    boxed = last_boxed(seg)
    if boxed is not None:
        return boxed.strip() or None
    spans = _math_spans(seg)
    if spans:
        return spans[-1].strip() or None
    seg = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*", "", seg, flags=re.I)
    return _strip_decor(seg) or None


def _has_word(s: str) -> bool:
    """A plain word of 3+ letters outside LaTeX commands and \\text{}: prose, not an answer."""
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf|textnormal)\s*\{[^{}]*\}", "", s)
    return re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", s) is not None


# ---------------------------------------------------------------------------------------------
# math family: normalisation (string level)

_TEXT_CMDS = r"text|textbf|textit|textnormal|mbox|mathrm|mathbf|mathit|textsf|operatorname"
_SPACE_CMDS = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad\b|~|\\displaystyle\b|\\[bB]ig+[lr]?\b")


def normalize_math(s: str) -> str:
    """Canonical string for a LaTeX answer; two answers with the same canonical string are equal."""
    s = str(s).strip()
    if s.startswith("\\boxed") or s.startswith("\\fbox"):
        s = last_boxed(s) or s
    s = re.sub(r"\\[()\[\]]", " ", s).replace("\n", " ")
    s = s.replace(",\\!", "").replace("{,}", "")  # LaTeX thousands separators: 29,\!322
    s = _SPACE_CMDS.sub(" ", s)
    s = re.sub(r"\\left(?![a-zA-Z])\.?|\\right(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\circ|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(rf"\\(?:{_TEXT_CMDS})\s*\{{\s*,?\s*(?:and|or)\s*\}}", ",", s)
    s = _unwrap_text(s)
    s = re.sub(r"\s+(?:and|or)\s+", ",", s)
    s = re.sub(r",(?:\s*,)+", ",", s)  # "2, 3, \text{ and } 4" left two commas
    s = re.sub(r"^\s*\\approx\s*", "", s)
    s = _strip_unit_words(s)
    s = _brace_args(s)
    s = _squeeze_spaces(s)
    s = s.replace("{,}", "")
    s = s.rstrip(".").strip(",")
    if s.count("=") == 1 and re.match(r"^[a-zA-Z]{1,2}(?:_\{?\w+\}?)?=", s):
        s = s.split("=", 1)[1]  # "x=5" answers "5"; both sides are normalised the same way
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    if m:
        s = m.group(1)
    num = normalize_number(s) if re.fullmatch(r"[-+]?[\d.]+", s) else None
    return num if num is not None else s


def _unwrap_text(s: str) -> str:
    """\\text{odd} -> 'odd', but a text unit after a value (8\\text{ cm}^2) is dropped."""
    pat = re.compile(rf"\\(?:{_TEXT_CMDS})\s*\{{")
    for _ in range(20):
        m = pat.search(s)
        if not m:
            return s
        end = balanced_end(s, m.end() - 1)
        if end < 0:
            return s
        content = s[m.end():end - 1]
        before = s[:m.start()].strip()
        if re.search(r"[\w})\]]$", before) and re.fullmatch(r"[\sa-zA-Z.]+", content) \
                and content.strip(". "):
            tail = re.match(r"\s*\^\s*(?:\{\s*[23]\s*\}|[23])", s[end:])
            s = s[:m.start()] + s[end + (tail.end() if tail else 0):]
        else:
            s = s[:m.start()] + content + s[end:]
    return s


def _strip_unit_words(s: str) -> str:
    """'5 cm', '20 square units' -> the value; letters after a backslash are commands, kept."""
    m = re.fullmatch(r"(.*?[\d}])\s*((?<![\\a-zA-Z])[a-zA-Z]{2,}\.?(?:\s+[a-zA-Z]{2,}\.?)*)"
                     r"(?:\s*\^\s*\{?[23]\}?)?\s*", s)
    return m.group(1) if m and m.group(1).strip() else s


def _brace_args(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}: one spelling for one value."""
    out, i = [], 0
    while i < len(s):
        m = re.compile(r"\\(frac|sqrt)(?![a-zA-Z])").match(s, i)
        if not m:
            out.append(s[i])
            i += 1
            continue
        out.append(m.group(0))
        i = m.end()
        if m.group(1) == "sqrt":
            idx = re.compile(r"\s*\[[^\[\]]*\]").match(s, i)
            if idx:
                out.append(idx.group(0).strip())
                i = idx.end()
        for _ in range(2 if m.group(1) == "frac" else 1):
            arg, i = _one_arg(s, i)
            out.append("{" + _brace_args(arg) + "}" if arg is not None else "")
    return "".join(out)


def _one_arg(s: str, i: int) -> tuple[str | None, int]:
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None, i
    if s[i] == "{":
        end = balanced_end(s, i)
        return (s[i + 1:end - 1], end) if end > 0 else (None, i)
    m = re.compile(r"\\[a-zA-Z]+").match(s, i)
    if m:
        return m.group(0), m.end()
    return s[i], i + 1


def _squeeze_spaces(s: str) -> str:
    """Drop spaces, except one that ends a command before a letter (\\pi r is not \\pir)."""
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


# ---------------------------------------------------------------------------------------------
# math family: equivalence

MAX_RAW = 2000         # longer answers are compared verbatim
MAX_LEN = 400          # longer normalised answers are compared as strings only
MAX_DEPTH = 40         # parser nesting
MAX_POW_BITS = 16384   # exact powers bigger than this fall back to floats (and overflow)
MAX_FACTORIAL = 3000   # 3000! has ~30,000 bits: exact and still cheap


def math_equal(a: str, b: str) -> bool:
    """Equal as LaTeX answers: same canonical string, or same structure with numerically equal
    parts (exact for rationals, at three fixed points for expressions with variables)."""
    if len(a) > MAX_RAW or len(b) > MAX_RAW:  # keeps the normalising regexes linear-time cheap
        return a.strip() == b.strip()
    na, nb = normalize_math(a), normalize_math(b)
    if na == nb:
        return True
    if len(na) > MAX_LEN or len(nb) > MAX_LEN or _wordy(na) or _wordy(nb):
        return False
    try:
        return _struct_equal(_structure(na, 0), _structure(nb, 0))
    except _Unparsable:
        return False


def _wordy(s: str) -> bool:
    """Words ('odd', 'Sunday') and letter names ('CD') are compared as strings: as products of
    variables 'odd' would equal 'dod'."""
    return _has_word(s) or re.fullmatch(r"[a-zA-Z]+", s) is not None


class _Unparsable(Exception):
    pass


def _split_top(s: str, sep: str) -> list[str]:
    """Split at `sep` outside any bracket; '(' may close with ']' (intervals)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith("\\{", i):
            depth += 1
            i += 2
            continue
        if s.startswith("\\}", i):
            depth -= 1
            i += 2
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _encloses(s: str) -> bool:
    """Whether s[0] is closed only by s[-1] (so '(1,2]' is one interval, '(1)(2)' is not)."""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return False
    return depth == 0


def _structure(s: str, depth: int):
    """('union'|'set'|'list'|'seq'|'matrix'|'eq'|'expr', ...) for a normalised answer."""
    if depth > 8:
        raise _Unparsable
    s = s.strip()
    if not s:
        raise _Unparsable
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return ("union", tuple(_structure(p, depth + 1) for p in parts))
    m = re.fullmatch(r"\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}", s)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r.strip()]
        return ("matrix", tuple(tuple(_structure(c, depth + 1) for c in r.split("&"))
                                for r in rows))
    if s.startswith("\\{") and s.endswith("\\}"):
        return ("set", tuple(_structure(p, depth + 1) for p in _split_top(s[2:-2], ",")))
    if s[0] in "([" and s[-1] in ")]" and _encloses(s):
        items = _split_top(s[1:-1], ",")
        if len(items) > 1:
            return ("seq", s[0] + s[-1], tuple(_structure(p, depth + 1) for p in items))
    items = _split_top(s, ",")
    if len(items) > 1:
        return ("list", tuple(_structure(p, depth + 1) for p in items))
    sides = _split_top(s, "=")
    if len(sides) == 2:
        return ("eq", _parse_expr(sides[0]), _parse_expr(sides[1]))
    return ("expr", _parse_expr(s))


def _struct_equal(a, b) -> bool:
    if a[0] != b[0]:
        return False
    kind = a[0]
    if kind == "expr":
        return _expr_equal(a[1], b[1])
    if kind == "eq":  # l1 = r1 and l2 = r2 are the same equation if l-r agree up to sign
        d1, d2 = ("sub", a[1], a[2]), ("sub", b[1], b[2])
        return _expr_equal(d1, d2) or _expr_equal(d1, ("neg", d2))
    if kind == "seq":
        return a[1] == b[1] and _ordered_equal(a[2], b[2])
    if kind in ("union",):
        return _ordered_equal(a[1], b[1])
    if kind == "matrix":
        return len(a[1]) == len(b[1]) and all(_ordered_equal(r, q) for r, q in zip(a[1], b[1]))
    return _unordered_equal(a[1], b[1])  # set, list: "x = 1, 2" answers in any order


def _ordered_equal(xs, ys) -> bool:
    return len(xs) == len(ys) and all(_struct_equal(x, y) for x, y in zip(xs, ys))


def _unordered_equal(xs, ys) -> bool:
    if len(xs) != len(ys):
        return False
    if len(xs) > 8:  # beyond 8! orderings, only the given order
        return _ordered_equal(xs, ys)
    same = [[_struct_equal(x, y) for y in ys] for x in xs]  # n^2 checks, then a cheap matching
    return any(all(same[i][j] for i, j in enumerate(perm)) for perm in permutations(range(len(ys))))


# -- restricted parser: numbers, letters, + - * / ^ !, \frac, \sqrt, \pi, \infty, trig/log,
#    brackets, |x|. Everything else is _Unparsable, which means "not equal".

_TOKEN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|\\[{}]|[a-zA-Z]|[-+*/^_()\[\]{}!|])")
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "ln", "log", "exp",
          "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh"}
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "phi", "varphi", "omega", "lambda", "mu",
          "sigma", "rho", "tau", "epsilon", "varepsilon", "psi", "chi", "eta", "zeta", "nu", "xi",
          "kappa", "infty"}
_MUL_CMDS = {"cdot", "times", "ast"}
_PRIMARY_START = re.compile(r"\d|\.|[a-zA-Z]|\\(?!cdot|times|div|ast\b)[a-zA-Z]+|[(\[{]")


def _tokenize(s: str) -> list[str]:
    tokens, i = [], 0
    while i < len(s):
        m = _TOKEN.match(s, i)
        if not m:
            if s[i:].strip() == "":
                break
            raise _Unparsable
        tokens.append(m.group(1))
        i = m.end()
    return tokens


class _Parser:
    def __init__(self, s: str):
        self.toks = _tokenize(s)
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Unparsable
        self.i += 1
        return tok

    def nest(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Unparsable

    def expr(self):
        self.nest()
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = ("add" if op == "+" else "sub", node, self.term())
        self.depth -= 1
        return node

    def term(self):
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/") or tok in ("\\cdot", "\\times", "\\div", "\\ast"):
                self.take()
                rhs = self.unary()
                node = ("div" if tok in ("/", "\\div") else "mul", node, rhs)
            elif tok is not None and _PRIMARY_START.match(tok):
                node = ("mul", node, self.power())  # implicit: 2x, 2\sqrt{3}, (a)(b)
            else:
                return node

    def unary(self):
        if self.peek() == "-":
            self.take()
            self.nest()
            node = ("neg", self.unary())
            self.depth -= 1
            return node
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            self.nest()
            exp = self.exponent()
            self.depth -= 1
            return ("pow", base, exp)
        return base

    def exponent(self):
        if self.peek() == "{":
            return self.group("{", "}")
        if self.peek() == "-":
            self.take()
            return ("neg", self.exponent())
        return self.postfix()

    def postfix(self):
        node = self.primary()
        while self.peek() == "!":
            self.take()
            node = ("fact", node)
        return node

    def group(self, open_: str, close: str):
        self.take(open_)
        node = self.expr()
        self.take(close)
        return node

    def primary(self):
        tok = self.peek()
        if tok is None:
            raise _Unparsable
        if tok[0].isdigit() or tok[0] == ".":
            self.take()
            if len(tok) > 100:
                raise _Unparsable
            return ("num", Fraction(tok))
        if tok in ("(", "[", "{"):
            return self.group(tok, {"(": ")", "[": "]", "{": "}"}[tok])
        if tok == "|":
            return ("abs", self.group("|", "|"))
        if len(tok) == 1 and tok.isalpha():
            self.take()
            return ("var", tok + self.subscript())
        if tok.startswith("\\"):
            return self.command(self.take()[1:])
        raise _Unparsable

    def subscript(self) -> str:
        if self.peek() != "_":
            return ""
        self.take()
        if self.peek() == "{":
            start = self.i
            self.group("{", "}")
            return "_" + "".join(self.toks[start:self.i])
        return "_" + self.take()

    def command(self, name: str):
        if name == "frac":
            num = self.group("{", "}")
            return ("div", num, self.group("{", "}"))
        if name == "sqrt":
            index = self.group("[", "]") if self.peek() == "[" else ("num", Fraction(2))
            return ("root", self.group("{", "}"), index)
        if name == "pi":
            return ("pi",)
        if name in _GREEK:
            return ("var", "\\" + name + self.subscript())
        if name in _FUNCS:
            return self.function(name)
        raise _Unparsable

    def function(self, name: str):
        base = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.group("{", "}") if self.peek() == "{" else self.primary()
        power = None
        if self.peek() == "^":  # \sin^2 x is (\sin x)^2
            self.take()
            power = self.exponent()
        arg = self.power() if self.peek() not in ("(", "{", "[") else self.primary()
        node = ("func", name, arg, base)
        return ("pow", node, power) if power is not None else node


def _parse_expr(s: str):
    p = _Parser(s)
    node = p.expr()
    if p.peek() is not None:
        raise _Unparsable
    return node


# -- evaluation: exact Fractions while the value is rational, complex floats otherwise

class _NoValue(Exception):
    pass


def _evaluate(node, env: dict):
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "pi":
        return complex(math.pi)
    if kind == "var":
        return env[node[1]]
    if kind == "neg":
        return -_evaluate(node[1], env)
    if kind == "abs":
        v = _evaluate(node[1], env)
        return abs(v) if isinstance(v, Fraction) else complex(abs(v))
    if kind == "fact":
        v = _evaluate(node[1], env)
        if not (isinstance(v, Fraction) and v.denominator == 1 and 0 <= v <= MAX_FACTORIAL):
            raise _NoValue
        return Fraction(math.factorial(int(v)))
    if kind == "func":
        return _function(node[1], _evaluate(node[2], env),
                         _evaluate(node[3], env) if node[3] is not None else None)
    a, b = _evaluate(node[1], env), _evaluate(node[2], env)
    if kind == "add":
        return a + b
    if kind == "sub":
        return a - b
    if kind == "mul":
        return a * b
    if kind == "div":
        if b == 0:
            raise _NoValue
        return a / b
    if kind == "pow":
        return _power(a, b)
    if kind == "root":
        return _root(a, b)
    raise _NoValue


def _power(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction) and b.denominator == 1:
        bits = max(a.numerator.bit_length(), a.denominator.bit_length(), 1) * abs(b.numerator)
        if a == 0 and b < 0:
            raise _NoValue
        if bits <= MAX_POW_BITS:
            return a ** int(b)
    try:
        a_c, b_c = complex(a), complex(b)
        if a_c == 0:
            if b_c.real > 0:
                return complex(0)
            raise _NoValue
        return a_c ** b_c
    except (OverflowError, ZeroDivisionError):
        raise _NoValue from None


def _root(a, index):
    if isinstance(a, Fraction) and isinstance(index, Fraction) and index.denominator == 1 \
            and 2 <= index.numerator <= 64 and a >= 0:
        n = int(index)
        num, den = _int_root(a.numerator, n), _int_root(a.denominator, n)
        if num is not None and den is not None:
            return Fraction(num, den)
    if index == 0:
        raise _NoValue
    return _power(a, 1 / (index if isinstance(index, Fraction) else complex(index)))


def _int_root(x: int, n: int) -> int | None:
    if x.bit_length() > MAX_POW_BITS:
        return None
    r = round(x ** (1.0 / n)) if x < 2 ** 1000 else None
    if r is None:
        return None
    for c in (r - 1, r, r + 1):
        if c >= 0 and c ** n == x:
            return c
    return None


_CMATH = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "exp": cmath.exp,
          "arcsin": cmath.asin, "arccos": cmath.acos, "arctan": cmath.atan,
          "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
          "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z),
          "csc": lambda z: 1 / cmath.sin(z)}


def _function(name: str, x, base):
    try:
        z = complex(x)
        if name in ("ln", "log"):
            # \log without a base is ambiguous (10 or e); both sides read it the same way
            return cmath.log(z) / (cmath.log(complex(base)) if base is not None else 1)
        return _CMATH[name](z)
    except (OverflowError, ZeroDivisionError, ValueError):
        raise _NoValue from None


def _variables(node, out: set) -> set:
    if node[0] == "var":
        out.add(node[1])
    for child in node[1:]:
        if isinstance(child, tuple):
            _variables(child, out)
    return out


_POINTS = 3


def _expr_equal(a, b) -> bool:
    names = sorted(_variables(a, set()) | _variables(b, set()))
    for k in range(_POINTS if names else 1):
        rng = random.Random(7919 + k)  # fixed points: the verdict never depends on a run
        env = {name: Fraction(rng.randint(1000, 3000), 997) for name in names}
        try:
            va, vb = _evaluate(a, env), _evaluate(b, env)
        except (_NoValue, KeyError, OverflowError, ZeroDivisionError, ValueError):
            return False
        if not _close(va, vb):
            return False
    return True


def _close(x, y) -> bool:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    try:
        cx, cy = complex(x), complex(y)
    except OverflowError:
        return False
    if any(map(math.isnan, (cx.real, cx.imag, cy.real, cy.imag))) or \
            any(map(math.isinf, (cx.real, cx.imag, cy.real, cy.imag))):
        return False
    return abs(cx - cy) <= 1e-9 + 1e-7 * max(abs(cx), abs(cy))
