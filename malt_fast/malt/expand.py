"""`malt-fast expand`: training questions -> trees.jsonl through the shared-prefix rollout engine.

Questions are expanded in fixed chunks (fixed by position in the configured question list, not by
what is left to do), each with a seed derived from the run seed and the chunk, so a rerun after a
kill recomputes an unfinished chunk exactly as the first run would have, and writes only the trees
that are missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from malt_fast.data import Example
from malt_fast.malt.answers import extract_answer, reward
from malt_fast.malt.prompts import ANSWER_MARKER, RolePrompts, load_prompts, question_text
from malt_fast.malt.trees import TreeWriter, finished_ids
from malt_fast.malt.verdict import (VERDICT_MARKER, extract_verdict, verdict_probe_ids,
                                    verdict_score, verdict_word_ids)
from malt_fast.rollout.tree import LevelSampling, RoleLayout, expand_tree, role_bindings

ROLES = ("generator", "verifier", "refiner")


def role_layout(prompts: RolePrompts) -> RoleLayout:
    """The questions passed to the engine are already rendered by `question_text`; every
    critique ends with a verdict line (appended where the verifier wrote none)."""
    return RoleLayout(question="{question}", verifier=prompts.verifier, refiner=prompts.refiner,
                      system=prompts.system or None, verdict=VERDICT_MARKER,
                      has_verdict=lambda text: extract_verdict(text) is not None)


def level_sampling(cfg: dict) -> dict[str, LevelSampling]:
    """Per-role sampling from a checked run config's `sampling` section (malt_fast.config).

    With `stop_after_answer` (the default) the generator's and refiner's replies end with the
    line that holds their final answer, as their instructions ask, and the verifier's with its
    verdict line: what a small model appends after it (a second solution, "Explanation: ...",
    a loop) is never scored nor trained on, and does not run the reply into its token budget."""
    s = cfg["sampling"]
    markers = {"generator": ANSWER_MARKER, "verifier": VERDICT_MARKER, "refiner": ANSWER_MARKER}
    out = {}
    for role in ROLES:
        stop_line = (markers[role],) if s["stop_after_answer"] else ()
        out[role] = LevelSampling(max_new_tokens=s["max_new_tokens"][role],
                                  temperature=s["temperature"], top_p=s["top_p"],
                                  top_k=s["top_k"], stop_line=stop_line)
    return out


def with_verdict_probe(sampling: dict[str, LevelSampling], tokenizer):
    """The sampling with the verifier's verdict words probed, an appended verdict line's word
    drawn among " correct" / " incorrect", and (flag ids, pass ids)."""
    flag_ids, pass_ids = verdict_probe_ids(tokenizer)
    sampling = dict(sampling)
    sampling["verifier"] = dataclasses.replace(sampling["verifier"], probe=flag_ids + pass_ids)
    sampling["verdict"] = dataclasses.replace(sampling["verifier"],
                                              first_token_ids=verdict_word_ids(tokenizer))
    return sampling, (flag_ids, pass_ids)


def critique_record(node: dict, tokenizer, probe_ids) -> dict:
    """A critique's reply fields, its verdict and the verifier's probability that the
    generation is wrong (null where the verdict word's token was not probed)."""
    return {**reply(node), "verdict": extract_verdict(node["text"]),
            "score": verdict_score(node["tokens"], node.get("probes"), tokenizer, *probe_ids)}


def reply(node: dict) -> dict:
    """A reply's text, why it ended ("eos" | "stop" | "length": cut by the token budget) and how
    many tokens it generated."""
    return {"text": node["text"], "finish": node["finish"], "tokens": len(node["tokens"])}


def tree_record(example: Example, raw: dict, tokenizer=None, probe_ids=None) -> dict:
    """The engine's tree (texts + token ids) -> the trees.jsonl record, leaves scored, and with
    a tokenizer, critiques' verdicts and scores."""
    def answer(node):
        return extract_answer(node["text"], example.dataset, example.choices)

    def leaf(node):
        return {**reply(node), "answer": answer(node),
                "reward": reward(node["text"], example.gold, example.dataset, example.choices)}

    rec = {"id": example.id, "dataset": example.dataset, "question": example.question,
           "gold": example.gold}
    if example.choices:
        rec["choices"] = example.choices
    def critique(v):
        return reply(v) if tokenizer is None else critique_record(v, tokenizer, probe_ids)

    rec["generations"] = [
        {**reply(g), "answer": answer(g),
         "verifications": [{**critique(v), "refinements": [leaf(r) for r in v["refinements"]]}
                           for v in g["verifications"]]}
        for g in raw["generations"]]
    return rec


def run_expand(examples: list[Example], engine, out_path, n: int = 3, sampling=None,
               prompts_path=None, seed: int = 0, chunk: int = 8, metrics_path=None,
               log=print, shard: tuple[int, int] = (0, 1), done: set | None = None) -> dict:
    """Expand `examples` into `out_path` (trees.jsonl), skipping ids already written there (and
    those in `done`). With `shard` = (rank, ranks) only chunk k = c // chunk with k % ranks ==
    rank is expanded: each chunk exactly as one process expands it (same questions, seed and
    batch), and its metrics record names the rank."""
    out_path = Path(out_path)
    done = finished_ids(out_path, report=log) | (done or set())
    sampling = sampling or {r: LevelSampling() for r in ROLES}
    tokenizer = role_bindings(engine)["verifier"][0].tokenizer
    sampling, probe_ids = with_verdict_probe(sampling, tokenizer)
    rank, ranks = shard
    todo_chunks = [(c, examples[c:c + chunk]) for c in range(0, len(examples), chunk)
                   if (c // chunk) % ranks == rank]
    todo_chunks = [(c, exs) for c, exs in todo_chunks if any(e.id not in done for e in exs)]
    totals = {"questions": 0, "generated_tokens": 0, "prefill_tokens": 0, "context_tokens": 0,
              "wall_s": 0.0}
    if not todo_chunks:
        return totals
    prompts_by_family: dict[str, RolePrompts] = {}
    with TreeWriter(out_path, n) as writer:
        for c, exs in todo_chunks:
            family = exs[0].dataset if not exs[0].choices else "multiple_choice"
            prompts = prompts_by_family.setdefault(family, load_prompts(prompts_path, family))
            t0 = time.perf_counter()
            raw, stats = expand_tree(engine, [question_text(e, prompts) for e in exs],
                                     role_layout(prompts), n, sampling, seed=seed * 1_000_003 + c)
            for e, tree in zip(exs, raw):
                if e.id not in done:
                    writer.write(tree_record(e, tree, tokenizer, probe_ids))
                    totals["questions"] += 1
            wall = time.perf_counter() - t0
            totals["generated_tokens"] += stats.get("generated_tokens", 0)
            totals["prefill_tokens"] += stats.get("prefill_tokens", 0)
            totals["context_tokens"] += stats.get("context_tokens", 0)
            totals["wall_s"] += wall
            if metrics_path is not None:
                rec = {"stage": "expand", "chunk": c, "questions": len(exs), "wall_s": wall,
                       **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}
                if ranks > 1:
                    rec.update(rank=rank, world_size=ranks)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    totals["tokens_per_s"] = totals["generated_tokens"] / max(totals["wall_s"], 1e-9)
    return totals


# ------------------------------------------------------------------ across ranks


def rank_parts(out_path) -> list[Path]:
    """The per-rank files next to trees.jsonl (trees.rank-R.jsonl) that an expansion across
    ranks writes before rank 0 merges them, whatever the number of ranks that wrote them."""
    out_path = Path(out_path)
    return sorted(out_path.parent.glob(f"{out_path.stem}.rank-*{out_path.suffix}"))


def rank_part(out_path, rank: int) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.rank-{rank}{out_path.suffix}")


def parts_finished_ids(out_path, log=print) -> set[str]:
    """Ids finished in trees.jsonl or in any rank's part: what no rank expands again."""
    done = finished_ids(out_path, report=log)
    for part in rank_parts(out_path):
        done |= finished_ids(part, report=log)
    return done


def merge_rank_parts(out_path, order: list[str], log=print) -> int:
    """trees.jsonl and every rank's part -> trees.jsonl (written atomically), one tree per id,
    in the configured question order (`order`; ids not in it after those, as found): the file
    one process writes. The parts are deleted after. Returns the number of trees."""
    from malt_fast.malt.trees import read_trees, write_trees

    out_path = Path(out_path)
    parts = rank_parts(out_path)
    trees: dict[str, dict] = {}
    for f in [out_path] + parts:
        if f.is_file():
            for t in read_trees(f, report=log):
                trees.setdefault(t["id"], t)
    pos = {i: k for k, i in enumerate(order)}
    write_trees(out_path, sorted(trees.values(), key=lambda t: pos.get(t["id"], len(pos))))
    for f in parts:
        f.unlink()
    return len(trees)
