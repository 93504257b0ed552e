"""'arith': procedurally generated arithmetic word problems with a difficulty knob.

A problem is a person, a countable item, a starting amount and `difficulty` events that change it
("buys 4 more", "gives 3 to Mia", from difficulty 2 "buys 3 bags with 5 in each", from 3 "the
number doubles" and a closing "shares them equally among 4 boxes"). Numbers are drawn from
[1, 10 * difficulty]; every intermediate amount stays a non-negative integer, so the gold answer
is always a whole number.

Splits are disjoint by construction: a problem belongs to the test split iff a hash of its text
falls in one bucket of five, whatever the seed; the seed only changes which problems are drawn.
`make_arith(n, ...)` is a prefix of `make_arith(m, ...)` for n < m.
"""

from __future__ import annotations

import hashlib
import random

from malt_fast.data.example import Example
from malt_fast.errors import MaltError

SPLITS = ("train", "test")
_TEST_BUCKETS = 5  # one in five problem texts is a test problem

_PEOPLE = [("Ava", "She"), ("Ben", "He"), ("Chloe", "She"), ("Dan", "He"), ("Emma", "She"),
           ("Finn", "He"), ("Grace", "She"), ("Hugo", "He"), ("Isla", "She"), ("Jack", "He"),
           ("Lily", "She"), ("Noah", "He")]
_FRIENDS = ["Mia", "Leo", "Zoe", "Sam", "Ruby", "Omar", "Nina", "Theo"]
_ITEMS = [("apples", True), ("cookies", True), ("oranges", True), ("muffins", True),
          ("marbles", False), ("stickers", False), ("pencils", False), ("cards", False),
          ("books", False), ("shells", False), ("stamps", False), ("coins", False)]


def make_arith(n: int, split: str, difficulty: int = 1, seed: int = 0) -> list[Example]:
    """`n` distinct problems of `split` ('train' or 'test') at `difficulty` (>= 1: the number of
    events and the scale of the numbers), the same for the same arguments on every machine."""
    if split not in SPLITS:
        raise MaltError(f"arith: no split {split!r} (available: {', '.join(SPLITS)})")
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 1:
        raise MaltError(f"arith: difficulty must be an integer >= 1, got {difficulty!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MaltError(f"arith: n must be a non-negative integer, got {n!r}")
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and machines
    rng = random.Random(f"arith/{split}/{difficulty}/{seed}")
    seen, out = set(), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        question, answer = arith_problem(rng, difficulty)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        out.append(Example(f"arith-d{difficulty}-s{seed}-{split}-{len(out)}", "arith", question,
                           str(answer)))
    if len(out) < n:
        raise MaltError(f"arith: only {len(out)} distinct {split} problems found at difficulty "
                        f"{difficulty} (asked for {n})")
    return out


def split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0 else "train"


def arith_problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    """(question text, integer answer) for one random problem."""
    top = 10 * difficulty
    name, she = rng.choice(_PEOPLE)
    item, food = rng.choice(_ITEMS)
    friend = rng.choice(_FRIENDS)
    amount = rng.randint(2, top)
    sentences = [f"{name} has {amount} {item}."]
    for step in range(difficulty):
        last = step == difficulty - 1
        if last and difficulty >= 3:
            share = _share(rng, amount, item, she)
            if share:
                text, amount = share
                sentences.append(text)
                return " ".join(sentences), amount
        text, amount = _event(rng, amount, difficulty, top, she, item, food, friend)
        sentences.append(text)
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), amount


def _event(rng, amount, difficulty, top, she, item, food, friend) -> tuple[str, int]:
    kinds = ["add", "sub"] + (["bags"] if difficulty >= 2 else []) + \
            (["double"] if difficulty >= 3 and amount <= 5 * top else [])
    kind = rng.choice(kinds)
    if kind == "sub" and amount < 2:
        kind = "add"
    if kind == "add":
        b = rng.randint(1, top)
        text = rng.choice([f"{she} buys {b} more {item}.", f"{she} finds {b} more {item}.",
                           f"{friend} gives {_obj(she)} {b} more {item}."])
        return text, amount + b
    if kind == "sub":
        b = rng.randint(1, amount - 1)
        verbs = [f"{she} gives {b} {item} to {friend}.", f"{she} loses {b} {item}."]
        if food:
            verbs.append(f"{she} eats {b} of the {item}.")
        return rng.choice(verbs), amount - b
    if kind == "bags":
        k, b = rng.randint(2, 5), rng.randint(2, min(top, 12))
        return f"{she} buys {k} bags with {b} {item} in each bag.", amount + k * b
    k = rng.choice([2, 3])
    return f"Then the number of {item} {she.lower()} has {'doubles' if k == 2 else 'triples'}.", \
        amount * k


def _share(rng, amount, item, she) -> tuple[str, int] | None:
    """A closing division with a whole answer, if `amount` has a small divisor."""
    ks = [k for k in range(2, 7) if amount % k == 0 and amount // k >= 1]
    if not ks:
        return None
    k = rng.choice(ks)
    return (f"{she} puts all the {item} into {k} boxes, the same number in each box. "
            f"How many {item} are in each box?", amount // k)


def _obj(she: str) -> str:
    return "her" if she == "She" else "him"
