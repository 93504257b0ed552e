"""`malt-fast evaluate`: single agent and the G->V->R pipeline, with majority voting, over seeds.

Per seed, a random subset of the test questions is answered by `chains` (default 3) independent
G->V->R chains at the sampling temperature (paper: 0.3):

- SA: accuracy of the generator's answer, averaged over the chains (the expected accuracy of one
  sample); SA+MV@3: the majority answer of the chains' generators;
- MA: accuracy of the refiner's final answer with untrained roles, averaged over chains;
  MA+MV@3: the majority of the chains' final answers;
- STaR, STaR+MV@3: a single agent again, its generator fine-tuned (SFT) on the generations whose
  own answer was correct (credit.star_rows): rejection sampling without the other roles;
- MALT, MALT+MV@3: the G->V->R pipeline with the trained role adapters.

Every method's chain c of a question uses the same request seed, so methods differ by their
weights, not by their luck.

Majority vote: answers are grouped by the dataset's equivalence check, unanswered outputs do not
vote, the largest group wins, and a tie goes to the group whose first answer came from the
earliest chain (deterministic); no answers at all counts as wrong.

Besides the accuracies, the results keep every answer: `per_question[method][seed][question id]
= {answer, correct}` (a majority-vote method: its answer and 1.0 or 0.0; a single-sample method:
the chains' answers and the fraction that was right), `comparisons`, the paired statistics of
the pairs the paper reports (malt_fast.eval.stats), and for each G->V->R pipeline its chain
records (`chains`) and what its verifier and refiner did (`roles`, malt_fast.eval.roles).
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path

from malt_fast.data import Example
from malt_fast.eval.roles import (chain_record, format_roles, merge_chains, roles_of,
                                  roles_table)
from malt_fast.eval.stats import comparisons, fewest_units_to_reject, significant
from malt_fast.malt.answers import answers_equal, extract_answer
from malt_fast.malt.expand import role_layout, with_verdict_probe
from malt_fast.malt.prompts import load_prompts, question_text
from malt_fast.malt.verdict import extract_verdict, verdict_score
from malt_fast.rollout.tree import LevelSampling, expand_generations, expand_tree, role_bindings

METHODS = ("SA", "SA+MV@3", "MA", "MA+MV@3", "STaR", "STaR+MV@3", "MALT", "MALT+MV@3")
REFINE_MODES = ("always", "flagged")


def majority(answers: list[str | None], ex: Example) -> str | None:
    groups: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if answers_equal(a, g[0], ex.dataset, ex.choices) or a == g[0]:
                g.append(a)
                break
        else:
            groups.append([a])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first (earliest-chain) group on ties


def correct(answer, ex: Example) -> bool:
    return answer is not None and answers_equal(answer, ex.gold, ex.dataset, ex.choices)


ROLLOUT_KEYS = ("prefill_tokens", "context_tokens", "generated_tokens", "decode_steps", "wall_s")
# the rollout that produces each method's answers (SA is the generator level of MA's chains)
ROLLOUT_METHODS = {"MA": ("SA", "SA+MV@3", "MA", "MA+MV@3"), "STaR": ("STaR", "STaR+MV@3"),
                   "MALT": ("MALT", "MALT+MV@3")}


def add_rollout(totals: dict, name: str, stats: dict) -> None:
    """Add one engine run's counts to totals[name] (prefill_tokens: tokens computed;
    context_tokens: what an engine without reuse would prefill)."""
    t = totals.setdefault(name, {k: 0 for k in ROLLOUT_KEYS})
    for k in ROLLOUT_KEYS:
        t[k] += stats.get(k, 0)


def _chain_questions(subsets: dict[int, list[Example]], chains: int, prompts_path):
    """Every seed's chain questions in one list, with each one's (request seed, path index):
    one engine run then samples what one run per seed would."""
    examples = next(iter(subsets.values()))
    family = "multiple_choice" if examples[0].choices else examples[0].dataset
    prompts = load_prompts(prompts_path, family)
    questions, keys = [], []
    for seed, subset in subsets.items():
        qs = [question_text(ex, prompts) for ex in subset for _ in range(chains)]
        questions += qs
        keys += [(seed, i) for i in range(len(qs))]
    return questions, keys, prompts


def _per_seed(items: list, subsets: dict[int, list[Example]], chains: int):
    """Split one run's per-chain items back into (seed, example, its chains' items)."""
    at = 0
    for seed, subset in subsets.items():
        for ex in subset:
            yield seed, ex, items[at:at + chains]
            at += chains


def run_chains(engines, subsets: dict[int, list[Example]], chains: int, sampling,
               prompts_path=None, rollout: dict | None = None,
               name: str = "MA", refine: str = "always") -> dict[int, list[dict]]:
    """Per seed, per example: the generator and final answers of each chain and what the
    verifier said of each generation (`verdicts`: "correct" | "incorrect" | None; `scores`: its
    probability that the generation is wrong, read from the verdict token's logits), every
    seed's chains in one engine run (the engines' counts are added to rollout[name]).
    With refine="flagged" the refiner only rewrites generations the verdict flags; an unflagged
    chain's final answer is its generation's."""
    questions, keys, prompts = _chain_questions(subsets, chains, prompts_path)
    tok = role_bindings(engines)["verifier"][0].tokenizer
    if not isinstance(sampling, dict):
        sampling = {r: sampling or LevelSampling() for r in ("generator", "verifier", "refiner")}
    sampling, (flag_ids, pass_ids) = with_verdict_probe(sampling, tok)
    if refine not in REFINE_MODES:
        raise ValueError(f"refine: expected one of {REFINE_MODES}, got {refine!r}")
    refine_if = (lambda critique: extract_verdict(critique) == "incorrect") \
        if refine == "flagged" else None
    trees, stats = expand_tree(engines, questions, role_layout(prompts), 1, sampling, seed=keys,
                               refine_if=refine_if)
    if rollout is not None:
        add_rollout(rollout, name, stats)
    out: dict[int, list[dict]] = {seed: [] for seed in subsets}
    for seed, ex, ts in _per_seed(trees, subsets, chains):
        gens, finals, verdicts, scores = [], [], [], []
        for t in ts:
            g = t["generations"][0]
            v = g["verifications"][0]
            final = v["refinements"][0] if v["refinements"] else g
            gens.append(extract_answer(g["text"], ex.dataset, ex.choices))
            finals.append(extract_answer(final["text"], ex.dataset, ex.choices))
            verdicts.append(extract_verdict(v["text"]))
            scores.append(verdict_score(v["tokens"], v.get("probes"), tok, flag_ids, pass_ids))
        out[seed].append({"id": ex.id, "gold": ex.gold, "generator": gens, "final": finals,
                          "verdicts": verdicts, "scores": scores})
    return out


def chain_records(answers: list[dict], examples: list[Example]) -> dict[str, list[dict]]:
    """Per question id, one record per chain (malt_fast.eval.roles)."""
    out = {}
    for a, ex in zip(answers, examples):
        out[ex.id] = [chain_record(correct(g, ex), v == "incorrect", s, correct(f, ex))
                      for g, f, v, s in zip(a["generator"], a["final"], a["verdicts"],
                                            a["scores"])]
    return out


def run_single(engine, subsets: dict[int, list[Example]], chains: int, sampling,
               prompts_path=None, rollout: dict | None = None,
               name: str = "STaR") -> dict[int, list[dict]]:
    """Per seed, per example: the answers of `chains` single-agent samples (the generator level
    alone), every seed's in one engine run."""
    questions, keys, prompts = _chain_questions(subsets, chains, prompts_path)
    s = sampling["generator"] if isinstance(sampling, dict) else sampling
    gens, stats = expand_generations(engine, questions, role_layout(prompts), 1, s, seed=keys)
    if rollout is not None:
        add_rollout(rollout, name, stats)
    out: dict[int, list[dict]] = {seed: [] for seed in subsets}
    for seed, ex, gs in _per_seed(gens, subsets, chains):
        answers = [extract_answer(g[0]["text"], ex.dataset, ex.choices) for g in gs]
        out[seed].append({"id": ex.id, "gold": ex.gold, "generator": answers, "final": answers})
    return out


def score(answers: list[dict], examples: list[Example]) -> dict:
    """Single-sample and MV@k accuracy of generators and finals, and per-turn transitions."""
    single_g = single_f = mv_g = mv_f = 0.0
    w2r = r2w = 0
    for a, ex in zip(answers, examples):
        cg = [correct(x, ex) for x in a["generator"]]
        cf = [correct(x, ex) for x in a["final"]]
        single_g += sum(cg) / len(cg)
        single_f += sum(cf) / len(cf)
        mv_g += correct(majority(a["generator"], ex), ex)
        mv_f += correct(majority(a["final"], ex), ex)
        w2r += sum(not g and f for g, f in zip(cg, cf))
        r2w += sum(g and not f for g, f in zip(cg, cf))
    n = len(examples)
    return {"generator": single_g / n, "generator_mv": mv_g / n, "final": single_f / n,
            "final_mv": mv_f / n, "wrong_to_right": w2r, "right_to_wrong": r2w,
            "chains": n * len(answers[0]["final"])}


def question_records(answers: list[dict], examples: list[Example], key: str) -> tuple[dict, dict]:
    """Per question id, the records of answers[i][key] ("generator" or "final") as one sample
    (the chains' answers, the fraction right) and as a majority vote (its answer, 1.0 / 0.0)."""
    single, vote = {}, {}
    for a, ex in zip(answers, examples):
        chain = a[key]
        single[ex.id] = {"answer": chain,
                         "correct": sum(correct(x, ex) for x in chain) / len(chain)}
        m = majority(chain, ex)
        vote[ex.id] = {"answer": m, "correct": float(correct(m, ex))}
    return single, vote


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def evaluate(test: list[Example], base_engines=None, trained_engines=None, star_engine=None,
             seeds=(0, 1, 2), questions: int = 30, chains: int = 3, sampling=None,
             prompts_path=None, refine: str = "always") -> dict:
    """Accuracy per method and seed of whichever engines are given: `base_engines` (SA, MA and
    their MV@3), `trained_engines` (MALT), `star_engine` (the STaR-trained single agent). An
    `*_engines` argument is one Engine or a dict role -> Engine or (Engine, adapter); the
    results' `rollout` holds each pipeline's engine counts (ROLLOUT_METHODS)."""
    parts = evaluate_seeds(test, base_engines, trained_engines, star_engine, seeds, questions,
                           chains, sampling, prompts_path, refine)
    return merge_seeds(list(parts.values()))


def evaluate_seeds(test: list[Example], base_engines=None, trained_engines=None,
                   star_engine=None, seeds=(0, 1, 2), questions: int = 30, chains: int = 3,
                   sampling=None, prompts_path=None,
                   refine: str = "always") -> dict[int, dict]:
    """evaluate()'s result of each seed alone, computed with every seed's chains of a method in
    one engine run (bigger decode batches; each chain samples with its own seed and path, as in
    a run per seed). The run's engine counts (`rollout`) are kept with the first seed's part."""
    if not test:
        raise ValueError("evaluate: the test set is empty")
    subsets = {seed: random.Random(seed).sample(test, min(questions, len(test))) for seed in seeds}
    per_question = {seed: {m: {} for m in METHODS} for seed in seeds}
    transitions: dict[int, dict] = {seed: {} for seed in seeds}
    chain_recs: dict[int, dict] = {seed: {} for seed in seeds}
    rollout: dict = {}
    pipeline = functools.partial(run_chains, refine=refine)
    runs = [("MA", base_engines, pipeline), ("STaR", star_engine, run_single),
            ("MALT", trained_engines, pipeline)]
    for name, engines, run in runs:
        if engines is None:
            continue
        answers = run(engines, subsets, chains, sampling, prompts_path, rollout, name)
        for seed, subset in subsets.items():
            methods = ROLLOUT_METHODS[name]
            key = "final" if name != "STaR" else "generator"
            q = per_question[seed]
            if name == "MA":  # SA: the same chains' generators
                q["SA"][str(seed)], q["SA+MV@3"][str(seed)] = \
                    question_records(answers[seed], subset, "generator")
            q[methods[-2]][str(seed)], q[methods[-1]][str(seed)] = \
                question_records(answers[seed], subset, key)
            if name != "STaR":
                t = score(answers[seed], subset)
                transitions[seed][name] = {k: t[k] for k in ("wrong_to_right", "right_to_wrong",
                                                             "chains")}
                chain_recs[seed][name] = {str(seed): chain_records(answers[seed], subset)}
    return {seed: summarize({"dataset": test[0].dataset, "seeds": [seed],
                             "questions": questions, "chains_per_question": chains,
                             "transitions": transitions[seed],
                             "per_question": {m: v for m, v in per_question[seed].items() if v},
                             "chains": chain_recs[seed],
                             "rollout": rollout if i == 0 else {}})
            for i, seed in enumerate(seeds)}


def merge_seeds(parts: list[dict], seeds=None) -> dict:
    """Per-seed results -> one result over all their seeds: per-question records merged,
    transitions and engine counts summed, accuracies and comparisons recomputed."""
    per_question: dict[str, dict] = {}
    transitions: dict[str, dict] = {}
    chain_recs: dict[str, dict] = {}
    rollout: dict = {}
    for p in parts:
        for m, by_seed in p["per_question"].items():
            per_question.setdefault(m, {}).update(by_seed)
        for name, t in p["transitions"].items():
            acc = transitions.setdefault(name, {k: 0 for k in t})
            for k, v in t.items():
                acc[k] += v
        merge_chains(chain_recs, p.get("chains", {}))
        for name, stats in p.get("rollout", {}).items():
            add_rollout(rollout, name, stats)
    seeds = [s for p in parts for s in p["seeds"]] if seeds is None else list(seeds)
    return summarize({"dataset": parts[0]["dataset"], "seeds": seeds,
                      "questions": parts[0]["questions"],
                      "chains_per_question": parts[0]["chains_per_question"],
                      "transitions": transitions, "per_question": per_question,
                      "chains": chain_recs, "rollout": rollout})


def summarize(results: dict) -> dict:
    """`methods` (per-seed accuracy, mean, std) and `comparisons`, from `per_question`, and
    `roles` from `chains` (the chain records); a seed key "t/e" (training seed t, evaluation seed e) counts
    as a seed of its own."""
    methods = {}
    for m in METHODS:
        seeds = results["per_question"].get(m)
        if not seeds:
            continue
        xs = [sum(r["correct"] for r in qs.values()) / len(qs) for qs in seeds.values()]
        mean, std = mean_std(xs)
        methods[m] = {"per_seed": xs, "mean": mean, "std": std}
    chains = results.get("chains", {})
    return {**results, "methods": methods, "comparisons": comparisons(results["per_question"]),
            "roles": roles_of(chains)}


def write_report(results: dict, out_dir) -> dict:
    """results.json, report.md (the paper's Table 1 layout) and plots/accuracy.png."""
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    from malt_fast.malt.trees import atomic_write_text

    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    ds = results["dataset"]
    lines = [f"# Results: {ds}", "",
             f"{len(results['seeds'])} seeds × {results['questions']} test questions, "
             f"{results['chains_per_question']} chains each; accuracy in %, mean ± std over "
             f"{seeds_phrase(results)}.", "",
             f"| Method | {ds} |", "| --- | --- |"]
    for m, r in results["methods"].items():
        lines.append(f"| {m} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} |")
    if results.get("roles"):
        lines += ["", "What the roles do, over all chains (malt_fast/eval/roles.py): generations "
                  "the verifier flagged as wrong, by whether they were wrong or right; AUROC of "
                  "its verdict-token probability that the generation is wrong; the refiner's "
                  "transitions from the generator's answer to the final one, and its net effect "
                  "(wrong → right minus right → wrong per chain, paired over (seed, question) "
                  "units):", "", *roles_table(results["roles"])]
    if results.get("comparisons"):
        lines += ["", "Paired comparisons on the same questions and seeds (a − b in points; 95% "
                  "paired bootstrap interval over (seed, question) units; exact sign / McNemar "
                  "test; questions where only one of the two did better; significant: the interval "
                  "excludes 0 and p < 0.05):", "", *comparison_rows(results["comparisons"])]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    plot_accuracy(results, out_dir / "plots" / "accuracy.png")
    return {"results": out_dir / "results.json", "report": out_dir / "report.md",
            "plot": out_dir / "plots" / "accuracy.png"}


def comparison_rows(comps: list[dict]) -> list[str]:
    """The paired comparisons as a markdown table (report.md, benchmarks/malt_report.py)."""
    rows = ["| a − b | diff | 95% CI | p | only a / only b | units | |",
            "| --- | ---: | --- | ---: | --- | ---: | --- |"]
    for c in comps:
        verdict = "significant" if significant(c) else "not significant"
        rows.append(f"| {c['a']} − {c['b']} | {c['diff']:+.1f} | [{c['ci_low']:+.1f}, "
                    f"{c['ci_high']:+.1f}] | {c['p']:.3g} | {c['only_a']} / {c['only_b']} | "
                    f"{c['units']} | {verdict} |")
    return rows


def seeds_phrase(results: dict) -> str:
    """What a mean ± std is over: evaluation seeds, and for trained methods also training
    seeds."""
    e, t = len(results["seeds"]), len(results.get("training_seeds") or [])
    if t:
        return (f"{t} training × {e} evaluation seeds (trained methods: STaR, MALT) and {e} "
                "evaluation seeds (untrained methods)")
    return f"{e} evaluation seeds"


def plot_accuracy(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    means = [100 * results["methods"][m]["mean"] for m in names]
    stds = [100 * results["methods"][m]["std"] for m in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4C72B0")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['dataset']}: mean ± std over seeds", fontsize=10)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict) -> str:
    """The accuracy table, then the paired comparisons (a difference whose 95% interval holds 0,
    or whose p is 0.05 or more, is printed as not significant)."""
    rows = [f"{'method':<10} {'accuracy (%)':>16}"]
    for m, r in results["methods"].items():
        rows.append(f"{m:<10} {100 * r['mean']:>8.2f} ± {100 * r['std']:<6.2f}")
    if results.get("roles"):
        rows += ["", "roles (verifier: generations flagged wrong; refiner: answer changes):",
                 format_roles(results["roles"])]
    comps = results.get("comparisons") or []
    if comps:
        rows += ["", f"paired, same questions and seeds ({comps[0]['units']} units): a - b "
                     "points [95% CI], sign-test p"]
        for c in comps:
            mark = "" if significant(c) else "   not significant"
            rows.append(f"{c['a'] + ' - ' + c['b']:<22} {c['diff']:+6.1f} [{c['ci_low']:+.1f}, "
                        f"{c['ci_high']:+.1f}]  p={c['p']:.3g}{mark}")
        units = comps[0]["units"]
        floor = 100 * fewest_units_to_reject() / units
        if not any(significant(c) for c in comps):
            rows.append(f"At this size ({units} questions x seeds) no difference is "
                        "significant: this run shows the pipeline works, not which method is "
                        "better. For that, evaluate more questions with more training data, e.g. "
                        "`malt-fast run configs/arith_100.yaml` (benchmarks/results/malt.md).")
        elif floor >= 5:
            rows.append(f"At this size ({units} questions x seeds) no difference under "
                        f"{floor:.0f} points can be significant; for smaller ones evaluate more "
                        "questions, e.g. `malt-fast run configs/arith_100.yaml` "
                        "(benchmarks/results/malt.md).")
    return "\n".join(rows)
