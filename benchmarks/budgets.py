"""How many replies each config's token budgets cut, per role, on the config's own task.

    python benchmarks/budgets.py configs/default.yaml configs/gsm8k.yaml --questions 16 \
        --json-out benchmarks/results/budgets.json

For each config: its first --questions training questions are expanded into G->V->R trees by the
pipeline's own expand stage (its n, temperature and per-role `sampling.max_new_tokens`, the shared-
prefix engine) on the config's model, or on the packaged SmolLM2-135M-Instruct when the config
names a model that is not on this machine (the Llama-8B configs: then the numbers are SmolLM2's
lengths under that config's budgets, and the table says so). Per role it prints the replies, the
share cut by the budget (`finish: length`: such replies are left out of training by default,
`credit.cut_replies`), and the 50th/90th/max generated tokens of the replies that finished, so a
budget can be set with room above the lengths the model actually needs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROLES = ("generator", "verifier", "refiner")


def percentile(xs: list[int], q: float) -> int | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(path: Path, questions: int, threads: int, log, cache_tokens: int) -> dict:
    import torch

    from malt_fast.cli import load_config
    from malt_fast.pipeline import Run, resolve
    from malt_fast.pipeline.expand import expand

    raw = load_config(path, [])
    model = raw.get("model")
    substituted = model is not None and not Path(model).exists()
    if substituted:  # e.g. /path/to/Meta-Llama-3.1-8B-Instruct
        raw["model"] = raw["tokenizer"] = None
    with tempfile.TemporaryDirectory() as tmp:
        raw.update(run_dir=tmp, train_questions=questions, device="cpu", threads=threads,
                   deepspeed=None)
        # the GPU configs' caches (math.yaml: 786,432 tokens, 18 GB for SmolLM2 in fp32) do not
        # fit this machine; a smaller cache schedules the same requests in more waves
        engine = dict(raw.get("engine") or {})
        engine["cache_tokens"] = min(engine.get("cache_tokens", cache_tokens), cache_tokens)
        raw["engine"] = engine
        cfg = resolve(raw, str(path))
        run = Run(cfg, log=log)
        t0 = time.perf_counter()
        trees = [json.loads(line) for line in open(expand(run))]
        wall = time.perf_counter() - t0
    levels = {"generator": [g for t in trees for g in t["generations"]]}
    levels["verifier"] = [v for g in levels["generator"] for v in g["verifications"]]
    levels["refiner"] = [r for v in levels["verifier"] for r in v["refinements"]]
    budgets = cfg["sampling"]["max_new_tokens"]
    roles = {}
    for role in ROLES:
        nodes = levels[role]
        cut = sum(n["finish"] == "length" for n in nodes)
        done = [n["tokens"] for n in nodes if n["finish"] != "length"]
        roles[role] = {"budget": budgets[role] if isinstance(budgets, dict) else budgets,
                       "replies": len(nodes), "cut": cut, "cut_fraction": cut / len(nodes),
                       "p50": percentile(done, 0.5), "p90": percentile(done, 0.9),
                       "max": max(done, default=None)}
    return {"config": str(path), "dataset": cfg["dataset"], "questions": len(trees),
            "model": "packaged SmolLM2-135M-Instruct" if cfg["model"] is None else cfg["model"],
            "substituted": substituted, "dtype": str(run.models.placement()[0]).replace("torch.", ""),
            "temperature": cfg["sampling"]["temperature"], "wall_s": wall, "roles": roles,
            "torch": torch.__version__}


def table(results: list[dict]) -> str:
    lines = ["| config | task | role | budget | cut | finished: p50 / p90 / max tokens |",
             "|---|---|---|---|---|---|"]
    for r in results:
        name = Path(r["config"]).name + (" (SmolLM2 stands in)" if r["substituted"] else "")
        for role in ROLES:
            s = r["roles"][role]
            lines.append(f"| {name} | {r['dataset']} | {role} | {s['budget']} | "
                         f"{100 * s['cut_fraction']:.1f}% ({s['cut']}/{s['replies']}) | "
                         f"{s['p50']} / {s['p90']} / {s['max']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--cache-tokens", type=int, default=131072,
                    help="cap on the configs' engine.cache_tokens (CPU memory)")
    args = ap.parse_args(argv)
    results = []
    for path in args.configs:
        results.append(measure(path, args.questions, args.threads,
                               log=lambda *a: print(*a, file=sys.stderr),
                               cache_tokens=args.cache_tokens))
        print(table(results[-1:]).split("\n", 2)[-1], flush=True)
    print(table(results))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
