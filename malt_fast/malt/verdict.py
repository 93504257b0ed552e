"""The verifier's verdict: its closing "Verdict: correct" / "Verdict: incorrect" line, read as
text (`extract_verdict`) and as a probability (`verdict_score`).

The probability comes from the rollout itself: the verifier level is sampled with
`LevelSampling(probe=flag_ids + pass_ids)` (ids from `verdict_probe_ids`), so every token of a
critique records the temperature-1 probabilities of those ids from the logits it was sampled
from. At the verdict word, P(flag) / (P(flag) + P(pass)) is the verifier's belief that the
generation is wrong, without a second forward pass. The probe tuple's order, flag ids first,
then pass ids, is what `verdict_score` expects.
"""

from __future__ import annotations

import re

VERDICT_MARKER = "Verdict:"

# "Verdict:", also bold or italic around either part ("**Verdict:**", "**Verdict**:")
_MARKER = re.compile(r"\bverdict[\s*_]*:", re.IGNORECASE)
# what may sit between the marker and the word: spaces, markdown, an opening quote or bracket
_WORD = re.compile(r"[\s*_`'\"(\[]*([a-z]+)", re.IGNORECASE)
_VERDICTS = {"correct": "correct", "right": "correct", "incorrect": "incorrect",
             "wrong": "incorrect"}
_FLAG_WORDS = ("incorrect", "wrong")
_PASS_WORDS = ("correct", "right")


def extract_verdict(text: str) -> str | None:
    """'correct' or 'incorrect' from the text's last verdict marker ("right" and "wrong" count
    as those), or None when there is no marker or the word after the last one is neither.

    Only the last marker counts: a critique may quote the format ("end with Verdict: correct
    or Verdict: incorrect") or change its mind before its final line."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _MARKER.finditer(text):
        pass
    if last is None:
        return None
    word = _WORD.match(text, last.end())
    # a whole word: "correctly" or "incorrectness" is no verdict
    return _VERDICTS.get(word.group(1).lower()) if word else None


def verdict_probe_ids(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(flag ids, pass ids): the first token of each way to write a verdict word ("incorrect",
    "wrong" / "correct", "right"; lower or capitalized; with a leading space or without).

    The first token is where the model decides, and all a probe can see. An id that starts
    words of both kinds says nothing about the verdict, so it is in neither set."""
    def first_ids(words):
        ids: list[int] = []
        for word in words:
            for form in (word, word.capitalize()):
                for text in (form, " " + form):
                    enc = tokenizer.encode(text)
                    if enc and enc[0] not in ids:
                        ids.append(enc[0])
        return ids

    flag, pas = first_ids(_FLAG_WORDS), first_ids(_PASS_WORDS)
    both = set(flag) & set(pas)
    return tuple(i for i in flag if i not in both), tuple(i for i in pas if i not in both)


def verdict_word_ids(tokenizer) -> tuple[int, int]:
    """The first tokens of " correct" and " incorrect": what an appended "Verdict:" line's word
    is drawn among (malt_fast.rollout.tree: a small model would often end its turn there)."""
    ids = tuple(tokenizer.encode(" " + w)[0] for w in ("correct", "incorrect"))
    if ids[0] == ids[1]:
        raise ValueError("the tokenizer starts ' correct' and ' incorrect' with one token: "
                         "no first token tells the verdicts apart")
    return ids


def verdict_score(tokens: list[int], probes: list | None, tokenizer, flag_ids, pass_ids
                  ) -> float | None:
    """The verifier's probability that the generation is wrong: at the verdict word after the
    last marker, sum P(flag ids) / (sum P(flag ids) + sum P(pass ids)).

    `probes` is `Completion.probes` (a node's "probes") of a critique sampled with
    `probe=flag_ids + pass_ids`, in that order. The marker is found in decoded prefixes of the
    tokens as `extract_verdict` finds it (markdown around it allowed), so both read the same
    line. None when there are no probes, no marker, no sampled probe at the word (a stop cut
    re-encoded it), the word's token is in neither set, or both sums are 0."""
    if probes is None:
        return None
    if len(probes) != len(tokens):
        raise ValueError(f"{len(probes)} probes for {len(tokens)} tokens")
    count = len(_MARKER.findall(tokenizer.decode(tokens)))
    if count == 0:
        return None
    # the shortest prefix holding every marker ends with the last one (the count only grows
    # with the prefix): a binary search decodes O(log n) prefixes, not n
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_MARKER.findall(tokenizer.decode(tokens[:mid]))) >= count:
            hi = mid
        else:
            lo = mid + 1
    prefix = tokenizer.decode(tokens[:lo])
    if _has_letter(prefix[list(_MARKER.finditer(prefix))[-1].end():]):
        return None  # the word shares a token with the colon: no probe isolates it
    # past markdown and spaces ("**", " *"), the first token with a letter starts the word
    k = next((j for j in range(lo, len(tokens)) if _has_letter(tokenizer.decode([tokens[j]]))),
             None)
    if k is None or probes[k] is None or tokens[k] not in {*flag_ids, *pass_ids}:
        return None
    row = probes[k]
    if len(row) != len(flag_ids) + len(pass_ids):
        raise ValueError(f"a probe row of {len(row)} values for {len(flag_ids)} flag and "
                         f"{len(pass_ids)} pass ids: sample with probe=flag_ids + pass_ids")
    flag, pas = sum(row[:len(flag_ids)]), sum(row[len(flag_ids):])
    return flag / (flag + pas) if flag + pas > 0 else None


def _has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)
