"""Credit assignment (docs/design.md): leaf rewards, values up the tree, labels, SFT and DPO sets.

    V(r) = R(r) = [T(r) == gold]          leaf reward, 0 or 1
    V(v) = mean of its refinements' V     (continuous means, not a vote of binarised children)
    V(g) = mean of its verifications' V
    positive  iff  V > theta              (strict: with n=3 a critique needs 2 of 3 correct
                                           refinements, a generation V >= 5/9)

Values are kept as exact fractions until they are written, so a value of exactly theta is never
pushed over (or under) it by float rounding: (1/3 + 2/3) / 2 is 1/2, negative.

Recipes (`recipe`, docs/malt.md "Credit recipes"): `paper` is the above. `correction` aims the
verifier and the refiner at correcting wrong generations:

    V(v) = w * [its verdict matches g's correctness] + (1 - w) * mean of its refinements' V
           (a critique flags g when its verdict says "incorrect"; no verdict: not flagged)
    V(g) = mean over its critiques of their refinements' mean (the paper's value: the verdict
           part must not reward a wrong generation for being flagged)
    refiner rows: every refinement under a wrong generation as the paper labels it (fix-ups are
           the positives, kept-wrong ones the negatives); the rows and pairs under right
           generations (mostly copies of the right solution) down-sampled to at most
           `copy_share` of the refiner's SFT rows and of its DPO pairs.

A reply cut by the token budget (`finish: length`) did not choose to stop there. Its subtree
counts in value iteration as any other (a cut refinement is scored as usual), but with
`cut_replies: drop` (the default) it is never an SFT target nor either side of a DPO pair; with
`keep` its rows carry `cut: true` (SFT) or `chosen_cut` / `rejected_cut` (DPO), and the trainer
renders it as an open turn, with no end-of-turn token to learn.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from malt_fast.data.example import Example
from malt_fast.errors import MaltError, fail
from malt_fast.malt.answers import answers_equal, extract_answer
from malt_fast.malt.verdict import extract_verdict
from malt_fast.malt.prompts import (RolePrompts, generator_messages, load_prompts, prompt_family,
                                    refiner_messages, verifier_messages)
from malt_fast.malt.trees import atomic_write_text, read_trees, write_trees

ROLES = ("generator", "verifier", "refiner")
PAIR_MODES = ("all", "max_k", "one")
CUT_MODES = ("drop", "keep")
RECIPES = ("paper", "correction")


@dataclass(frozen=True)
class Recipe:
    """How values and training rows are made (module docstring)."""
    name: str = "paper"
    verdict_weight: float = 1.0  # correction: w, the verdict's share of a critique's value
    copy_share: float = 0.2      # correction: at most this share of refiner rows from right g

    def __post_init__(self):
        if self.name not in RECIPES:
            raise MaltError(f"recipe: expected one of {', '.join(RECIPES)}, got {self.name!r}")
        if not 0 <= self.verdict_weight <= 1:
            raise MaltError(f"verdict_weight: expected a number in [0, 1], got "
                            f"{self.verdict_weight!r}")
        if not 0 <= self.copy_share < 1:
            raise MaltError(f"copy_share: expected a number in [0, 1), got {self.copy_share!r}")


def run_credit(trees_path, out_dir, theta=0.5, pairs="all", max_pairs=None, seed=0,
               prompts_path=None, cut_replies="drop", log=None,
               recipe: Recipe | None = None) -> dict:
    """Score `trees_path` and write trees.jsonl, sft_{role}.jsonl, dpo_{role}.jsonl,
    sft_star.jsonl (the STaR baseline's set) and summary.json (last, so its presence means the
    stage finished) into `out_dir`."""
    theta_f = _theta(theta)
    _check_pairing(pairs, max_pairs)
    recipe = recipe or Recipe()
    if cut_replies not in CUT_MODES:
        raise MaltError(f"cut_replies: expected one of {', '.join(CUT_MODES)}, "
                        f"got {cut_replies!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    trees = read_trees(trees_path)
    if not trees:
        raise fail(trees_path, "no trees (empty file)")
    unknown = sum(1 for t in trees for node in replies(t) if "finish" not in node)
    if unknown:
        log(f"{trees_path}: {unknown} replies have no 'finish' (written before finish reasons "
            "were recorded); they are treated as finished")
    prompts = _PromptCache(prompts_path)
    scored = [score_tree(t, theta_f, recipe) for t in trees]
    sft = {role: [] for role in ROLES}
    dpo = {role: [] for role in ROLES}
    star = []
    for tree in scored:
        tree_sft, tree_dpo = tree_examples(tree, prompts.get(tree), theta_f, pairs, max_pairs, seed,
                                           cut_replies)
        for role in ROLES:
            sft[role] += tree_sft[role]
            dpo[role] += tree_dpo[role]
        star += star_rows(tree, prompts.get(tree), cut_replies)
    # the paper keeps every row under right generations: a share of 1 caps nothing
    share = recipe.copy_share if recipe.name == "correction" else 1.0
    copies = {}
    sft["refiner"], copies["sft"] = cap_copies(sft["refiner"], share, f"{seed}/sft")
    dpo["refiner"], copies["pairs"] = cap_copies(dpo["refiner"], share, f"{seed}/dpo")

    out = Path(out_dir)
    write_trees(out / "trees.jsonl", scored)
    for role in ROLES:
        _write_jsonl(out / f"sft_{role}.jsonl", sft[role])
        _write_jsonl(out / f"dpo_{role}.jsonl", dpo[role])
        if not sft[role]:
            print(f"{out / f'sft_{role}.jsonl'}: warning: no positive {role} examples",
                  file=sys.stderr)
    _write_jsonl(out / "sft_star.jsonl", star)
    summary = summarize(scored, theta_f, sft, dpo)
    summary["star"] = {"sft": len(star)}
    summary["correction"] = correction_counts(scored, sft["refiner"], dpo["refiner"], copies)
    summary.update(trees=str(trees_path), theta=float(theta), pairs=pairs,
                   max_pairs=max_pairs, seed=seed, cut_replies=cut_replies,
                   recipe=dataclasses.asdict(recipe))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _theta(theta) -> Fraction:
    # via str: Fraction(0.6) is 0.59999..., which would make a value of exactly 3/5 positive
    try:
        if isinstance(theta, bool):
            raise ValueError
        return Fraction(str(theta))
    except (ValueError, TypeError):
        raise MaltError(f"theta: expected a number, got {theta!r}") from None


def _check_pairing(pairs, max_pairs) -> None:
    if pairs not in PAIR_MODES:
        raise MaltError(f"pairs: expected one of {', '.join(PAIR_MODES)}, got {pairs!r}")
    if pairs == "max_k":
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
            raise MaltError(f"max_pairs: pairs='max_k' needs a positive integer, got {max_pairs!r}")
    elif max_pairs is not None:
        raise MaltError(f"max_pairs: only used with pairs='max_k' (pairs is {pairs!r})")


class _PromptCache:
    """One RolePrompts per family, loaded on first use: a math-only run needs no
    multiple-choice section in a custom prompts file."""

    def __init__(self, path):
        self.path = path
        self.loaded: dict[str, RolePrompts] = {}

    def get(self, tree: dict) -> RolePrompts:
        family = prompt_family(tree["dataset"], tree.get("choices"))
        if family not in self.loaded:
            self.loaded[family] = load_prompts(self.path, family)
        return self.loaded[family]


def example_of(tree: dict) -> Example:
    return Example(tree["id"], tree["dataset"], tree["question"], tree["gold"], tree.get("choices"))


def leaf_reward(leaf: dict, tree: dict) -> tuple[str | None, int]:
    """(answer, reward) of a refinement: recomputed from its text when it has one (a stale or
    hand-typed reward must not decide the labels), else the stored reward is trusted."""
    if "text" in leaf:
        answer = extract_answer(leaf["text"], tree["dataset"], tree.get("choices"))
        ok = answers_equal(answer, tree["gold"], tree["dataset"], tree.get("choices"))
        return answer, int(ok)
    return leaf.get("answer"), int(leaf["reward"])


def score_tree(tree: dict, theta: Fraction, recipe: Recipe | None = None) -> dict:
    """A copy of `tree` with answer/reward on every leaf and value/positive on every inner node;
    every generation also gets `correct` (its own answer), every critique its `verdict`."""
    recipe = recipe or Recipe()
    w = Fraction(str(recipe.verdict_weight))
    scored = {k: v for k, v in tree.items() if k != "generations"}
    gens = []
    for g in tree["generations"]:
        g_correct = generation_correct(g, tree)
        vers, refined = [], []
        for v in g["verifications"]:
            leaves = []
            for r in v["refinements"]:
                answer, rew = leaf_reward(r, tree)
                leaves.append({**r, "answer": answer, "reward": rew})
            mean = Fraction(sum(leaf["reward"] for leaf in leaves), len(leaves))
            refined.append(mean)
            verdict = extract_verdict(v.get("text", ""))
            value = mean
            if recipe.name == "correction":
                match = (verdict == "incorrect") == (not g_correct)
                value = w * int(match) + (1 - w) * mean
            vers.append({**v, "verdict": verdict, "value": value, "positive": value > theta,
                         "refinements": leaves})
        value = sum(refined, Fraction(0)) / len(vers)
        gens.append({**g, "correct": g_correct, "value": value, "positive": value > theta,
                     "verifications": vers})
    scored["generations"] = gens
    return _floats(scored)


def generation_correct(g: dict, tree: dict) -> bool:
    answer = extract_answer(g.get("text", ""), tree["dataset"], tree.get("choices"))
    return answers_equal(answer, tree["gold"], tree["dataset"], tree.get("choices"))


def _floats(obj):
    """Fractions -> floats for JSON (labels were decided on the exact values already)."""
    if isinstance(obj, Fraction):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_floats(v) for v in obj]
    return obj


def _leaf_positive(leaf: dict, theta: Fraction) -> bool:
    return Fraction(leaf["reward"]) > theta


def is_cut(node: dict) -> bool:
    """Cut by the token budget. A node without `finish` (older trees) counts as finished."""
    return node.get("finish") == "length"


def replies(tree: dict):
    """Every reply node of a tree: generations, verifications, refinements."""
    for g in tree["generations"]:
        yield g
        for v in g["verifications"]:
            yield v
            yield from v["refinements"]


def tree_examples(tree: dict, prompts: RolePrompts, theta: Fraction, pairs="all",
                  max_pairs=None, seed=0, cut_replies="drop") -> tuple[dict, dict]:
    """SFT rows (positive nodes) and DPO rows (positive x negative siblings) of a scored tree;
    replies cut by the token budget are left out (`drop`) or marked (`keep`)."""
    ex = example_of(tree)
    sft = {role: [] for role in ROLES}
    dpo = {role: [] for role in ROLES}
    tid = tree["id"]
    keep_cut = cut_replies == "keep"

    def add(role, parent, letter, prompt, children, positive):
        texts = [c.get("text", "") for c in children]
        labels = [positive(c) for c in children]
        cut = [is_cut(c) for c in children]
        usable = [bool(t.strip()) and (keep_cut or not k) for t, k in zip(texts, cut)]
        for i, (text, lab) in enumerate(zip(texts, labels)):
            if lab and usable[i]:
                sft[role].append({"id": f"{parent}{letter}{i}", "prompt": prompt,
                                  "completion": text, **({"cut": True} if cut[i] else {})})
        for p, q in select_pairs(texts, labels, pairs, max_pairs, f"{seed}/{parent}{letter}",
                                 usable):
            marks = {f"{side}_cut": True for side, i in (("chosen", p), ("rejected", q))
                     if cut[i]}
            dpo[role].append({"id": f"{parent}{letter}{p}>{letter}{q}", "prompt": prompt,
                              "chosen": texts[p], "rejected": texts[q], **marks})

    gens = tree["generations"]
    add("generator", f"{tid}/", "g", generator_messages(ex, prompts), gens,
        lambda n: n["positive"])
    for i, g in enumerate(gens):
        vers = g["verifications"]
        add("verifier", f"{tid}/g{i}/", "v", verifier_messages(ex, g["text"], prompts), vers,
            lambda n: n["positive"])
        for j, v in enumerate(vers):
            start = (len(sft["refiner"]), len(dpo["refiner"]))
            add("refiner", f"{tid}/g{i}/v{j}/", "r",
                refiner_messages(ex, g["text"], v["text"], prompts),
                v["refinements"], lambda n: _leaf_positive(n, theta))
            if g.get("correct"):  # rows that keep (mostly copy) a right solution
                for rows, at in zip((sft["refiner"], dpo["refiner"]), start):
                    for row in rows[at:]:
                        row[COPY] = True
    return sft, dpo


COPY = "_under_right"  # an in-memory mark of refiner rows under a right generation


def cap_copies(rows: list[dict], share: float, key: str) -> tuple[list[dict], dict]:
    """Rows under right generations kept to at most `share` of the result (a seeded sample, in
    the rows' order), every other row kept; the marks removed. Returns (rows, counts)."""
    copies = [i for i, r in enumerate(rows) if r.get(COPY)]
    others = len(rows) - len(copies)
    # the largest k with k <= share * (others + k)
    limit = len(copies) if share >= 1 else int(share * others / (1 - share) + 1e-9)
    keep = set(copies) if len(copies) <= limit else \
        set(random.Random(key).sample(copies, limit))
    out = [{k: v for k, v in r.items() if k != COPY} for i, r in enumerate(rows)
           if not r.get(COPY) or i in keep]
    return out, {"under_right": len(copies), "kept": min(len(copies), limit),
                 "under_wrong": others}


def correction_counts(scored: list[dict], sft_refiner: list[dict],
                      dpo_refiner: list[dict], copies: dict) -> dict:
    """What the trees hold to learn correction from: generations wrong and right, critiques
    flagging each, refinements fixing wrong ones and breaking right ones; with the refiner's
    rows after a `correction` recipe's cap (`copies`)."""
    c = {"generations_wrong": 0, "generations_right": 0, "wrong_flagged": 0,
         "right_flagged": 0, "critiques_under_wrong": 0, "critiques_under_right": 0,
         "fixes": 0, "kept_wrong": 0, "kept_right": 0, "broken": 0}
    for tree in scored:
        for g in tree["generations"]:
            side = "right" if g["correct"] else "wrong"
            c[f"generations_{side}"] += 1
            for v in g["verifications"]:
                c[f"critiques_under_{side}"] += 1
                c[f"{side}_flagged"] += v["verdict"] == "incorrect"
                for r in v["refinements"]:
                    key = {("wrong", 1): "fixes", ("wrong", 0): "kept_wrong",
                           ("right", 1): "kept_right", ("right", 0): "broken"}[side, r["reward"]]
                    c[key] += 1
    c["refiner_sft"], c["refiner_pairs"] = len(sft_refiner), len(dpo_refiner)
    c["refiner_rows_under_right"] = copies
    return c


def star_rows(tree: dict, prompts: RolePrompts, cut_replies="drop") -> list[dict]:
    """The STaR baseline's SFT rows: each generation whose own answer is correct, as a single
    agent's (question -> answer) example. Rejection sampling on the final reward alone, with no
    verifier or refiner in the loop: what MALT's credit assignment is compared against. Cut
    generations follow `cut_replies` as MALT's rows do."""
    ex = example_of(tree)
    rows = []
    for i, g in enumerate(tree["generations"]):
        text = g.get("text", "")
        if is_cut(g) and cut_replies == "drop":
            continue
        answer = extract_answer(text, ex.dataset, ex.choices)
        if text.strip() and answers_equal(answer, ex.gold, ex.dataset, ex.choices):
            rows.append({"id": f"{tree['id']}/g{i}", "prompt": generator_messages(ex, prompts),
                         "completion": text, **({"cut": True} if is_cut(g) else {})})
    return rows


def select_pairs(texts: list[str], labels: list[bool], mode="all", max_pairs=None,
                 key="0", usable=None) -> list[tuple[int, int]]:
    """(chosen, rejected) sibling indices. Pairs whose two texts are equal teach nothing, and a
    leaf without text (or not `usable`: a cut reply that is dropped) cannot be trained on, so
    they are left out before any sampling. 'max_k' and 'one' sample without replacement with a
    generator seeded by `key` (seed + parent id), so reruns and resumed runs pick the same
    pairs."""
    usable = [bool(t.strip()) and (usable is None or usable[i]) for i, t in enumerate(texts)]
    all_pairs = [(p, q) for p in range(len(texts)) for q in range(len(texts))
                 if labels[p] and not labels[q] and usable[p] and usable[q]
                 and texts[p] != texts[q]]
    limit = None if mode == "all" else 1 if mode == "one" else max_pairs
    if limit is None or len(all_pairs) <= limit:
        return all_pairs
    return sorted(random.Random(key).sample(all_pairs, limit))


def summarize(scored: list[dict], theta: Fraction, sft: dict, dpo: dict) -> dict:
    """Per role: positives, negatives, SFT rows, pairs, replies cut by the token budget (count
    and fraction); per level: node count and mean value."""
    nodes = {role: [] for role in ROLES}  # (value, positive, cut) of every node, over all trees
    for tree in scored:
        for g in tree["generations"]:
            nodes["generator"].append((g["value"], g["positive"], is_cut(g)))
            for v in g["verifications"]:
                nodes["verifier"].append((v["value"], v["positive"], is_cut(v)))
                for r in v["refinements"]:
                    nodes["refiner"].append((r["reward"], _leaf_positive(r, theta), is_cut(r)))
    roles, levels = {}, {}
    for role in ROLES:
        pos = sum(1 for _, p, _ in nodes[role] if p)
        cut = sum(1 for _, _, c in nodes[role] if c)
        roles[role] = {"positives": pos, "negatives": len(nodes[role]) - pos,
                       "sft": len(sft[role]), "pairs": len(dpo[role]), "cut": cut,
                       "cut_fraction": cut / len(nodes[role])}
        levels[role] = {"nodes": len(nodes[role]),
                        "mean_value": sum(v for v, _, _ in nodes[role]) / len(nodes[role])}
    return {"questions": len(scored), "roles": roles, "levels": levels}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
