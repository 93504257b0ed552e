"""Majority voting (ties, equivalent forms, abstentions) and scoring, by hand-worked cases."""

from malt_fast.data import Example
from malt_fast.eval.evaluate import majority, mean_std, score

NUM = Example("q", "gsm8k", "?", "12")
MATHS = Example("m", "math", "?", r"\frac{1}{2}")


def test_majority_picks_the_largest_group():
    assert majority(["3", "12", "12"], NUM) == "12"
    assert majority([None, None, "7"], NUM) == "7"  # unanswered outputs do not vote
    assert majority([None, None, None], NUM) is None


def test_majority_ties_go_to_the_earliest_chain():
    assert majority(["5", "12", "7"], NUM) == "5"
    assert majority(["7", "5", "5", "7"], NUM) == "7"
    assert majority([None, "9", "4"], NUM) == "9"


def test_majority_groups_equivalent_answers():
    # 0.5 and \frac12 are one answer under the MATH equivalence check: 2 votes beat \frac{1}{3}
    assert majority([r"\frac{1}{3}", "0.5", r"\frac12"], MATHS) in ("0.5", r"\frac12")


def test_score_single_mv_and_transitions():
    answers = [
        {"generator": ["12", "3", "3"], "final": ["12", "12", "3"]},    # q1: 1/3 -> 2/3 right
        {"generator": ["12", "12", "12"], "final": ["12", None, "1"]},  # q2: 3/3 -> 1/3 right
    ]
    s = score(answers, [NUM, NUM])
    assert s["generator"] == (1 / 3 + 1) / 2 and s["final"] == (2 / 3 + 1 / 3) / 2
    assert s["generator_mv"] == 0.5  # q1 majority "3" wrong, q2 "12" right
    assert s["final_mv"] == 1.0      # q1 "12"; q2 tie 12 / 1 -> earliest chain "12"
    assert (s["wrong_to_right"], s["right_to_wrong"], s["chains"]) == (1, 2, 6)


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    m, s = mean_std([0.2, 0.4, 0.6])
    assert abs(m - 0.4) < 1e-12 and abs(s - 0.2) < 1e-12  # sample std (n - 1)


def test_all_methods_run_with_the_packaged_model(smollm_gguf, tmp_path):
    from malt_fast.data import load_dataset
    from malt_fast.eval.evaluate import evaluate, write_report
    from malt_fast.malt.expand import level_sampling
    from malt_fast.model import load_model, load_tokenizer
    from malt_fast.model.lora import AdapterView, LoRAConfig, add_adapter
    from malt_fast.rollout import Engine

    model, tok = load_model(smollm_gguf), load_tokenizer(smollm_gguf)
    for role in ("generator", "verifier", "refiner"):  # zero-initialised: "trained" = base
        add_adapter(model, role, LoRAConfig(rank=2, alpha=4.0))

    def engine(adapter):
        return Engine(AdapterView(model, adapter), tok, max_batch=16, cache_tokens=8192,
                      progress=False)

    test = load_dataset("arith", "test")
    from malt_fast.pipeline import resolve

    sampling = level_sampling(resolve({"sampling": {"max_new_tokens": 40}}))
    results = evaluate(test, engine(None), {r: engine(r) for r in ("generator", "verifier",
                                                                   "refiner")},
                       star_engine=engine("generator"), seeds=(0,), questions=2, chains=3,
                       sampling=sampling)
    assert list(results["methods"]) == ["SA", "SA+MV@3", "MA", "MA+MV@3", "STaR", "STaR+MV@3",
                                        "MALT", "MALT+MV@3"]
    for r in results["methods"].values():
        assert r["per_seed"][0] in (0.0, 1 / 6, 1 / 3, 0.5, 2 / 3, 5 / 6, 1.0, 0.25, 0.75)
    # zero adapters + the same seeds: the "trained" pipeline samples exactly what the base did
    assert results["methods"]["MALT"]["mean"] == results["methods"]["MA"]["mean"]
    # the single agent alone (generator level only) draws the generator samples of the chains
    assert results["methods"]["STaR"]["mean"] == results["methods"]["SA"]["mean"]
    assert results["methods"]["STaR+MV@3"]["mean"] == results["methods"]["SA+MV@3"]["mean"]
    paths = write_report(results, tmp_path)
    assert "| SA+MV@3 |" in paths["report"].read_text()
    # one chain record per chain, every critique with a verdict and a score
    for name in ("MA", "MALT"):
        recs = [r for q in results["chains"][name]["0"].values() for r in q]
        assert len(recs) == 6 and all(r["score"] is not None for r in recs)
        assert results["roles"][name]["verifier"]["scored"] == 6
    assert "| Pipeline | wrong flagged |" in paths["report"].read_text()
    # the refiner only under flagged generations: an unflagged chain keeps its generation's
    flagged = evaluate(test, engine(None), seeds=(0,), questions=2, chains=3,
                       sampling=sampling, refine="flagged")
    recs = [r for q in flagged["chains"]["MA"]["0"].values() for r in q]
    assert all(r["r_correct"] == r["g_correct"] for r in recs if not r["flagged"])
    assert [r["g_correct"] for r in recs] == \
        [r["g_correct"] for q in results["chains"]["MA"]["0"].values() for r in q]
