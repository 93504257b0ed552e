"""MALT evaluation with three trained LoRA roles, four ways, in one process, on the same model,
adapters, questions and seeds:

(a) as the evaluation ran before: per-role engines with merged weights, no prefix index, one
    run per evaluation seed (a chain is one request per level with n = 1, so each request
    prefilled its whole context: system prompt, question and the earlier turns);
(b) per-role engines, merged weights, prefix index, every seed's chains in one run per engine
    (within a role, chains of one question share the question; levels one after another);
(c) one multi-adapter engine (the base once, the three adapters applied per row), prefix index,
    every seed's chains in one run: rows of every role decode in the same steps, levels
    interleaved (what the pipeline runs now, engine.multi_adapter: true);
(d) as (c) without the prefix index (what the index alone buys on that engine).

    python benchmarks/trained_eval.py configs/default.yaml [--dtype auto] [--json F]

The config's run directory must hold a finished training stage (train/checkpoints/{role}/
adapters: run `malt-fast run CONFIG` first). The questions and chains are the run's evaluation's
(evaluate.seeds, .questions, .chains; --questions overrides), with its sampling. Tokens/s =
generated tokens / wall time of each way's fastest of --repeats runs; prefill = tokens computed; context = what an engine without reuse
prefills; floor = the fewest tokens any cache keyed by (weights, tokens) must compute for the same
chains (per role, the distinct prefixes of its requests' contexts).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def setup(config: Path, dtype: str):
    from malt_fast.config import read_yaml
    from malt_fast.pipeline import Run, resolve
    from malt_fast.pipeline.train import checkpoints, training_seeds

    cfg = resolve(read_yaml(config, [f"dtype={dtype}"]), source=str(config))
    run = Run(cfg, log=lambda *a: None)
    ckpt = checkpoints(run, training_seeds(run)[-1])
    loaded = run.models.use_roles(ckpt) if ckpt.is_dir() else []
    if not {"generator", "verifier", "refiner"} <= set(loaded):
        raise SystemExit(f"{ckpt}: needs the three roles' adapters, found {loaded} (run "
                         f"`malt-fast run {config}` first)")
    return run


def chain_questions(run, k: int | None):
    """Per evaluation seed: (chain questions, their (seed, index) keys), as evaluate() draws
    them; and the role layout."""
    import random

    from malt_fast.eval.evaluate import _chain_questions
    from malt_fast.malt.expand import role_layout

    e, test = run.cfg["evaluate"], run.examples("test")
    k = k or e["questions"]
    per_seed = {}
    for seed in e["seeds"]:
        subset = {seed: random.Random(seed).sample(test, min(k, len(test)))}
        questions, keys, prompts = _chain_questions(subset, e["chains"], run.cfg["prompts"])
        per_seed[seed] = (questions, keys)
    return per_seed, role_layout(prompts)


def engines_for(run, way: str, max_batch: int, cache_tokens: int):
    from malt_fast.model.lora import MultiAdapterView, merged_model
    from malt_fast.rollout import Engine

    roles = ("generator", "verifier", "refiner")
    kw = dict(max_batch=max_batch, cache_tokens=cache_tokens, progress=False)
    model, tok = run.models.model, run.models.tok
    if way in ("a", "b"):
        return {r: Engine(merged_model(model, r), tok, prefix_reuse=way == "b", **kw)
                for r in roles}
    view = MultiAdapterView(model, [None, *roles], max_rows=max(1024, max_batch))
    eng = Engine(view, tok, prefix_reuse=way == "c", **kw)
    return {r: (eng, r) for r in roles}


def prefill_floor(run, trees_and_questions, layout) -> int:
    """The fewest tokens any cache keyed by (weights, tokens) must compute for these chains: per
    role, the distinct prefixes of all its requests' contexts (a token trie's size)."""
    from malt_fast.rollout.tree import Transcript

    transcript = Transcript(run.models.tok, layout)
    tries = {r: {} for r in ("generator", "verifier", "refiner")}
    size = 0
    for tree, q in trees_and_questions:
        g = tree["generations"][0]
        v = g["verifications"][0]
        ctx = transcript.generator_context(q)
        contexts = {"generator": ctx}
        ctx = transcript.next_context(ctx, g["tokens"], q, "verifier")
        contexts["verifier"] = ctx
        contexts["refiner"] = transcript.next_context(ctx, v["tokens"], q, "refiner")
        for role, tokens in contexts.items():
            node = tries[role]
            for t in tokens:
                if t not in node:
                    node[t] = {}
                    size += 1
                node = node[t]
    return size


def run_way(run, way, per_seed, layout, args) -> tuple[dict, list]:
    from malt_fast.malt.expand import level_sampling
    from malt_fast.rollout import expand_tree

    engines = engines_for(run, way, args.max_batch, args.cache_tokens)
    # (a): one run per seed, as before; the others: every seed's chains in one run
    batches = list(per_seed.values()) if way == "a" else \
        [tuple(sum((list(x[i]) for x in per_seed.values()), []) for i in range(2))]
    totals = dict(generated_tokens=0, prefill_tokens=0, context_tokens=0, decode_steps=0,
                  prefill_calls=0, prefill_s=0.0)
    finals, done = [], []
    t0 = time.perf_counter()
    for questions, keys in batches:
        trees, st = expand_tree(engines, questions, layout, 1, level_sampling(run.cfg), seed=keys)
        finals += [t["generations"][0]["verifications"][0]["refinements"][0]["text"]
                   for t in trees]
        done += list(zip(trees, questions))
        for k in totals:
            totals[k] += st[k]
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, tokens_per_s=totals["generated_tokens"] / wall, **totals,
                prefill_floor=prefill_floor(run, done, layout)), finals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("--questions", type=int, default=None,
                   help="test questions per seed (default: the config's evaluate.questions)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--ways", default="abcd")
    p.add_argument("--max-batch", type=int, default=96)
    p.add_argument("--cache-tokens", type=int, default=32768)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = setup(args.config, args.dtype)
    per_seed, layout = chain_questions(run, args.questions)
    n_chains = sum(len(q) for q, _ in per_seed.values())
    dtype = next(run.models.model.parameters()).dtype
    print(f"{n_chains} chains ({len(per_seed)} seeds), {dtype}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    # warm-up: first matmuls of each shape build oneDNN kernels
    first = next(iter(per_seed))
    run_way(run, "c", {first: tuple(x[:2] for x in per_seed[first])}, layout, args)
    # the ways in turn, --repeats times; each way's fastest run counts (the first runs of a
    # process also pay for allocator growth and kernel setup, whichever way comes first)
    rows, finals, walls = {}, {}, {w: [] for w in args.ways}
    for _ in range(args.repeats):
        for way in args.ways:
            row, finals[way] = run_way(run, way, per_seed, layout, args)
            walls[way].append(row["wall_s"])
            if way not in rows or row["wall_s"] < rows[way]["wall_s"]:
                rows[way] = row
            print(way, json.dumps(row), file=sys.stderr)
    for way, row in rows.items():
        row["walls"] = walls[way]
    base = rows.get("a")
    print("\n| way | wall s | tokens/s | × (a) | prefill tokens | context tokens | prefill / "
          "context | floor / context | decode steps | final answers = (a)'s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"a": "(a) per-role merged, no reuse", "b": "(b) per-role merged, prefix index",
             "c": "(c) one multi-adapter engine, prefix index",
             "d": "(d) one multi-adapter engine, no reuse"}
    for way, r in rows.items():
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        same = (f"{sum(x == y for x, y in zip(finals[way], finals['a']))}/{n_chains}"
                if base else "-")
        print(f"| {names[way]} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {speed} | "
              f"{r['prefill_tokens']} | {r['context_tokens']} | "
              f"{r['prefill_tokens'] / r['context_tokens']:.1%} | "
              f"{r['prefill_floor'] / r['context_tokens']:.1%} | {r['decode_steps']} | {same} |")
    if args.json:
        info = dict(command=" ".join(sys.argv), cpu=platform.processor() or platform.machine(),
                    torch=torch.__version__, dtype=str(dtype), threads=torch.get_num_threads(),
                    chains=n_chains, seeds=list(per_seed), ways=rows,
                    same_final_as_a={w: sum(x == y for x, y in zip(finals[w], finals["a"]))
                                     for w in rows} if base else None)
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
