"""Credit assignment on hand-worked trees: values, strict labels, SFT rows and DPO pair counts.

Trees are built from a matrix of leaf outcomes: outcomes[i][j][k] = 1 means refinement k of
critique j of generation i ends with the gold answer (72), 0 a wrong one (71). All rewards are
recomputed from the leaf text, so the expected numbers below follow from the matrices alone.
"""

import json

import pytest

from malt_fast.errors import MaltError
from malt_fast.malt.credit import run_credit, select_pairs
from malt_fast.malt.prompts import (generator_messages, load_prompts, refiner_messages,
                                    verifier_messages)
from malt_fast.data.datasets import Example


def make_tree(tid, outcomes):
    return {"id": tid, "dataset": "gsm8k", "question": f"Question {tid}?", "gold": "72",
            "generations": [
                {"text": f"{tid} solution {i}", "verifications": [
                    {"text": f"{tid} critique {i}.{j}", "refinements": [
                        {"text": f"{tid} fix {i}.{j}.{k}: total {72 if ok else 71}.\n"
                                 f"Final Answer: {72 if ok else 71}"}
                        for k, ok in enumerate(leaves)]}
                    for j, leaves in enumerate(gen)]}
                for i, gen in enumerate(outcomes)]}


# n=3. By hand:
#   g0: critiques [1,1,1] [1,1,1] [1,1,1] -> V(v) = 1, 1, 1      V(g0) = 1        positive
#   g1: critiques [1,1,0] [1,1,0] [1,0,0] -> V(v) = 2/3,2/3,1/3  V(g1) = 5/9      positive (> 1/2)
#   g2: critiques [0,0,0] [0,0,0] [0,0,0] -> V(v) = 0, 0, 0      V(g2) = 0        negative
# generator: 2 pos, 1 neg; pairs g0>g2, g1>g2 = 2
# verifier:  g0 3 pos (no pair, all correct), g1 2 pos 1 neg (2 pairs), g2 3 neg (no pair)
#            -> 5 pos, 4 neg, 2 pairs
# refiner:   ones: 9 + 5 + 0 = 14 pos, 13 neg; pairs = ones x zeros per critique:
#            g0 0; g1 2*1 + 2*1 + 1*2 = 6; g2 0 -> 6
# mean value per level: generator (1 + 5/9 + 0)/3 = 14/27; verifier (3 + 5/3 + 0)/9 = 14/27;
#            refiner 14/27 (equal n at every level makes the pooled means agree)
TREE_N3 = [[[1, 1, 1]] * 3, [[1, 1, 0], [1, 1, 0], [1, 0, 0]], [[0, 0, 0]] * 3]

# n=2, the exact threshold value (strict: 1/2 is negative):
#   g0: [1,0] [1,1] -> V(v) = 1/2 (neg), 1 (pos)   V(g0) = 3/4  positive
#   g1: [1,0] [0,0] -> V(v) = 1/2 (neg), 0 (neg)   V(g1) = 1/4  negative
# generator 1 pos 1 neg, 1 pair; verifier 1 pos 3 neg, 1 pair (under g0);
# refiner 4 pos 4 neg, pairs: g0v0 1*1, g0v1 0, g1v0 1*1, g1v1 0 -> 2
TREE_N2 = [[[1, 0], [1, 1]], [[1, 0], [0, 0]]]

# n=2, every generation at exactly 1/2: [1,1][0,0] -> (1 + 0)/2; [1,0][1,0] -> (1/2 + 1/2)/2
# generator 0 pos 2 neg, 0 pairs; verifier: 1 pos ([1,1]) 3 neg, 1 pair; refiner 4 pos 4 neg,
# pairs: [1,1] 0, [0,0] 0, [1,0] 1, [1,0] 1 -> 2
TREE_HALF = [[[1, 1], [0, 0]], [[1, 0], [1, 0]]]

# n=4:
#   g0: [1,1,1,0] [1,1,0,0] [1,0,0,0] [1,1,1,1] -> 3/4, 1/2, 1/4, 1  V = 5/8  positive
#   g1: all zeros                                -> 0 x4              V = 0    negative
#   g2: [1,1,0,0] x4                             -> 1/2 x4 (all neg)  V = 1/2  negative
#   g3: [1,1,1,0] x4                             -> 3/4 x4 (all pos)  V = 3/4  positive
# generator: 2 pos, 2 neg -> all 4 pairs; max_k(3) 3; one 1
# verifier: g0 2 pos 2 neg -> 4 pairs (the only parent with pairs); max_k(3) 3; one 1
# refiner pairs per critique (ones x zeros): g0 3, 4, 3, 0; g1 0 x4; g2 4 x4; g3 3 x4
#   all: 10 + 16 + 12 = 38; max_k(3): min(., 3) -> 3+3+3 + 12 + 12 = 33; one: 3 + 4 + 4 = 11
TREE_N4 = [[[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]],
           [[0, 0, 0, 0]] * 4, [[1, 1, 0, 0]] * 4, [[1, 1, 1, 0]] * 4]


def write(tmp_path, *trees, name="trees.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(t) + "\n" for t in trees))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def counts(summary):
    return {role: (s["positives"], s["negatives"], s["pairs"])
            for role, s in summary["roles"].items()}


def test_n3_values_labels_and_sets(tmp_path):
    out = tmp_path / "out"
    summary = run_credit(write(tmp_path, make_tree("q", TREE_N3)), out)
    assert counts(summary) == {"generator": (2, 1, 2), "verifier": (5, 4, 2),
                               "refiner": (14, 13, 6)}
    for level in ("generator", "verifier", "refiner"):
        assert summary["levels"][level]["mean_value"] == pytest.approx(14 / 27)
    assert summary["questions"] == 1
    assert json.loads((out / "summary.json").read_text()) == summary

    (scored,) = read_jsonl(out / "trees.jsonl")
    gens = scored["generations"]
    assert [g["value"] for g in gens] == pytest.approx([1, 5 / 9, 0])
    assert [g["positive"] for g in gens] == [True, True, False]
    assert [v["value"] for v in gens[1]["verifications"]] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert [v["positive"] for v in gens[1]["verifications"]] == [True, True, False]
    leaf = gens[1]["verifications"][2]["refinements"][0]
    assert (leaf["answer"], leaf["reward"]) == ("72", 1)

    sft = {role: read_jsonl(out / f"sft_{role}.jsonl")
           for role in ("generator", "verifier", "refiner")}
    assert [r["id"] for r in sft["generator"]] == ["q/g0", "q/g1"]
    assert len(sft["verifier"]) == 5 and len(sft["refiner"]) == 14
    dpo_gen = read_jsonl(out / "dpo_generator.jsonl")
    assert [(r["id"], r["chosen"], r["rejected"]) for r in dpo_gen] == [
        ("q/g0>g2", "q solution 0", "q solution 2"), ("q/g1>g2", "q solution 1", "q solution 2")]
    dpo_ver = read_jsonl(out / "dpo_verifier.jsonl")
    assert [r["id"] for r in dpo_ver] == ["q/g1/v0>v2", "q/g1/v1>v2"]

    # scoring its own output again (in place) changes nothing
    again = run_credit(out / "trees.jsonl", out)
    assert again["roles"] == summary["roles"] and read_jsonl(out / "trees.jsonl") == [scored]


def test_prompts_follow_the_shared_transcript(tmp_path):
    out = tmp_path / "out"
    run_credit(write(tmp_path, make_tree("q", TREE_N3)), out)
    prompts = load_prompts(family="math")
    ex = Example("q", "gsm8k", "Question q?", "72")
    sft_g = read_jsonl(out / "sft_generator.jsonl")[1]
    assert sft_g["prompt"] == generator_messages(ex, prompts)
    assert sft_g["completion"] == "q solution 1"
    sft_v = read_jsonl(out / "sft_verifier.jsonl")
    v = next(r for r in sft_v if r["id"] == "q/g1/v1")
    assert v["prompt"] == verifier_messages(ex, "q solution 1", prompts)
    assert v["completion"] == "q critique 1.1"
    r = next(r for r in read_jsonl(out / "sft_refiner.jsonl") if r["id"] == "q/g1/v2/r0")
    assert r["prompt"] == refiner_messages(ex, "q solution 1", "q critique 1.2", prompts)
    assert r["completion"].endswith("Final Answer: 72")
    dpo_r = read_jsonl(out / "dpo_refiner.jsonl")
    pair = next(p for p in dpo_r if p["id"] == "q/g1/v2/r0>r1")
    assert pair["chosen"].endswith("72") and pair["rejected"].endswith("71")
    assert pair["prompt"] == r["prompt"]


def test_n2_and_exact_half_is_negative(tmp_path):
    summary = run_credit(write(tmp_path, make_tree("a", TREE_N2)), tmp_path / "a")
    assert counts(summary) == {"generator": (1, 1, 1), "verifier": (1, 3, 1), "refiner": (4, 4, 2)}
    summary = run_credit(write(tmp_path, make_tree("h", TREE_HALF)), tmp_path / "h")
    assert counts(summary) == {"generator": (0, 2, 0), "verifier": (1, 3, 1), "refiner": (4, 4, 2)}
    (scored,) = read_jsonl(tmp_path / "h" / "trees.jsonl")
    assert [g["value"] for g in scored["generations"]] == [0.5, 0.5]
    assert not (tmp_path / "h" / "sft_generator.jsonl").read_text()


@pytest.mark.parametrize("pairs,k,expected", [
    ("all", None, {"generator": 4, "verifier": 4, "refiner": 38}),
    ("max_k", 3, {"generator": 3, "verifier": 3, "refiner": 33}),
    ("one", None, {"generator": 1, "verifier": 1, "refiner": 11}),
])
def test_n4_pair_counts_per_option(tmp_path, pairs, k, expected):
    summary = run_credit(write(tmp_path, make_tree("f", TREE_N4)), tmp_path / "o", pairs=pairs,
                         max_pairs=k, seed=3)
    assert {role: s["pairs"] for role, s in summary["roles"].items()} == expected
    assert summary["roles"]["generator"]["positives"] == 2
    (scored,) = read_jsonl(tmp_path / "o" / "trees.jsonl")
    assert [g["value"] for g in scored["generations"]] == [5 / 8, 0, 0.5, 0.75]
    # every sampled pair is a positive over a negative sibling
    for row in read_jsonl(tmp_path / "o" / "dpo_refiner.jsonl"):
        assert row["chosen"].endswith("72") and row["rejected"].endswith("71")


def test_sampled_pairs_are_deterministic_and_seeded():
    texts = [f"t{i}" for i in range(8)]
    labels = [True] * 4 + [False] * 4  # 16 pairs
    a = select_pairs(texts, labels, "max_k", 5, key="0/q/g")
    assert a == select_pairs(texts, labels, "max_k", 5, key="0/q/g")
    assert len(set(a)) == 5 and all(p < 4 <= q for p, q in a)
    draws = {tuple(select_pairs(texts, labels, "one", None, key=f"{s}/q/g")) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    # identical texts make no pair; nor does a leaf without text
    assert select_pairs(["same", "same", "x"], [True, False, False]) == [(0, 2)]
    assert select_pairs(["", "b"], [True, False]) == []


def test_leaf_reward_recomputed_from_text_else_trusted(tmp_path):
    t = make_tree("r", [[[1, 0]], [[0, 0]]])  # 1 critique per generation: n = (2, 1, 2)
    leaves = t["generations"][0]["verifications"][0]["refinements"]
    leaves[0]["reward"] = 0     # stale reward on a correct text: recomputed to 1
    leaves[1] = {"reward": 1}   # no text: trusted -> critique value (1 + 1)/2 = 1
    summary = run_credit(write(tmp_path, t), tmp_path / "o")
    (scored,) = read_jsonl(tmp_path / "o" / "trees.jsonl")
    assert scored["generations"][0]["value"] == 1.0
    leaves = scored["generations"][0]["verifications"][0]["refinements"]
    assert [r["reward"] for r in leaves] == [1, 1]
    # the text-less leaf counts in values but cannot be an SFT row or a pair member
    assert summary["roles"]["refiner"]["positives"] == 2
    assert len(read_jsonl(tmp_path / "o" / "sft_refiner.jsonl")) == 1


def test_theta_is_strict_and_exact(tmp_path):
    # one critique with 3 of 5 correct: V = 3/5. theta = 0.6 -> not > 0.6, negative
    # (as a float, 0.6 is slightly below 3/5; the comparison must not see that)
    path = write(tmp_path, make_tree("t", [[[1, 1, 1, 0, 0]]]))
    assert run_credit(path, tmp_path / "a", theta=0.6)["roles"]["verifier"]["positives"] == 0
    assert run_credit(path, tmp_path / "b", theta=0.5)["roles"]["verifier"]["positives"] == 1


def test_multiple_choice_tree(tmp_path):
    t = {"id": "c", "dataset": "csqa", "question": "Where is money kept?", "gold": "A",
         "choices": {"A": "bank", "B": "library"},
         "generations": [{"text": "g", "verifications": [{"text": "v", "refinements": [
             {"text": "Final Answer: A"}, {"text": "It is kept in a bank."},
             {"text": "Final Answer: (B)"}]}]}]}
    summary = run_credit(write(tmp_path, t), tmp_path / "o")
    assert counts(summary)["refiner"] == (2, 1, 2)
    prompt = read_jsonl(tmp_path / "o" / "sft_generator.jsonl")[0]["prompt"]
    assert "A. bank\nB. library" in prompt[-1]["content"]


def test_bad_input_is_one_line_naming_file_line_field(tmp_path):
    good = make_tree("a", TREE_N2)
    bad = make_tree("b", TREE_N2)
    del bad["generations"][1]["verifications"][0]["refinements"][1]["text"]
    path = write(tmp_path, good, bad)
    with pytest.raises(MaltError) as info:
        run_credit(path, tmp_path / "o")
    assert str(info.value) == (f"{path}:2: field 'generations[1].verifications[0].refinements[1]"
                               ".text': missing (a leaf needs text or reward)")
    assert not (tmp_path / "o").exists()

    lopsided = make_tree("c", [[[1, 0], [1, 0]], [[1, 0, 1], [1, 0]]])
    with pytest.raises(MaltError, match=rf"^{path}:1: field 'generations\[1\].verifications\[0\]"
                                        r".refinements': 3 branches .* \(inconsistent counts\)$"):
        run_credit(write(tmp_path, lopsided), tmp_path / "o")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MaltError, match=rf"^{empty}: no trees \(empty file\)$"):
        run_credit(empty, tmp_path / "o")


@pytest.mark.parametrize("kwargs,message", [
    ({"pairs": "some"}, "pairs: expected one of all, max_k, one"),
    ({"pairs": "max_k"}, "max_pairs: pairs='max_k' needs a positive integer"),
    ({"pairs": "all", "max_pairs": 2}, "max_pairs: only used with pairs='max_k'"),
    ({"theta": "high"}, "theta: expected a number"),
])
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(MaltError, match=message):
        run_credit(write(tmp_path, make_tree("a", TREE_N2)), tmp_path / "o", **kwargs)


def test_star_set_keeps_generations_with_a_correct_answer(tmp_path):
    # STaR's labels come from each generation's own answer, not from the refinements' values:
    # g0 is right but its subtree fails (V = 0), g1 is wrong but its subtree succeeds (V = 1),
    # g2 has no answer, g3 (empty text) cannot be trained on.
    tree = make_tree("s", [[[0, 0, 0]] * 3, [[1, 1, 1]] * 3, [[1, 0, 0]] * 3, [[1, 1, 1]] * 3])
    texts = ["2 boxes of 36.\nFinal Answer: 72", "I think 70.\nFinal Answer: 70",
             "not sure", ""]
    for g, text in zip(tree["generations"], texts):
        g["text"] = text
    out = tmp_path / "out"
    summary = run_credit(write(tmp_path, tree), out)
    star = read_jsonl(out / "sft_star.jsonl")
    ex = Example("s", "gsm8k", "Question s?", "72")
    assert star == [{"id": "s/g0", "prompt": generator_messages(ex, load_prompts(family="math")),
                     "completion": texts[0]}]
    assert summary["star"] == {"sft": 1}
    # MALT's generator set is the opposite here: g1 and g3 have V = 1 (g3 dropped: no text)
    assert [r["id"] for r in read_jsonl(out / "sft_generator.jsonl")] == ["s/g1"]


# ------------------------------------------------------------------ replies cut by the budget


def finish(tree, cut_paths):
    """Every reply gets finish/tokens; the (i,), (i, j) or (i, j, k) paths in cut_paths were
    cut by the token budget."""
    for i, g in enumerate(tree["generations"]):
        for j, v in enumerate(g["verifications"]):
            for k, r in enumerate(v["refinements"]):
                r.update(finish="length" if (i, j, k) in cut_paths else "eos", tokens=9)
            v.update(finish="length" if (i, j) in cut_paths else "stop", tokens=7)
        g.update(finish="length" if (i,) in cut_paths else "eos", tokens=5)
    return tree


# TREE_N3 with cuts, by hand:
#   g1 (positive, V = 5/9) is cut: no generator SFT row for it, no pair g1>g2 -> 1 SFT, 1 pair.
#   Its subtree still counts: V(g1) stays 5/9, so the value iteration is unchanged.
#   g1/v0 (positive) is cut: verifier pairs under g1 were v0>v2, v1>v2 -> only v1>v2; SFT 5 -> 4.
#   g1/v1/r0 (a correct leaf: reward 1, still scored) and g1/v2/r1 (a wrong leaf) are cut: the
#   refiner pairs under g1 were v0: 2x1, v1: 2x1, v2: 1x2 = 6 -> v1: 1x1, v2: 1x1 -> 4;
#   refiner SFT 14 -> 13.
CUTS = {(1,), (1, 0), (1, 1, 0), (1, 2, 1)}


def test_cut_replies_are_never_targets_by_default(tmp_path):
    out = tmp_path / "out"
    summary = run_credit(write(tmp_path, finish(make_tree("q", TREE_N3), CUTS)), out)
    assert counts(summary) == {"generator": (2, 1, 1), "verifier": (5, 4, 1),
                               "refiner": (14, 13, 4)}
    roles = summary["roles"]
    assert [roles[r]["sft"] for r in ("generator", "verifier", "refiner")] == [1, 4, 13]
    assert [(roles[r]["cut"], roles[r]["cut_fraction"]) for r in roles] == \
        [(1, 1 / 3), (1, 1 / 9), (2, 2 / 27)]
    assert summary["cut_replies"] == "drop"
    (scored,) = read_jsonl(out / "trees.jsonl")
    g1 = scored["generations"][1]
    assert g1["value"] == pytest.approx(5 / 9) and g1["finish"] == "length" and g1["tokens"] == 5
    assert g1["verifications"][1]["refinements"][0]["reward"] == 1  # cut, and still scored
    cut_texts = {"q solution 1", "q critique 1.0", g1["verifications"][1]["refinements"][0]["text"],
                 g1["verifications"][2]["refinements"][1]["text"]}
    for role in ("generator", "verifier", "refiner"):
        for row in read_jsonl(out / f"sft_{role}.jsonl"):
            assert row["completion"] not in cut_texts and "cut" not in row
        for row in read_jsonl(out / f"dpo_{role}.jsonl"):
            assert row["chosen"] not in cut_texts and row["rejected"] not in cut_texts
    assert [r["id"] for r in read_jsonl(out / "dpo_verifier.jsonl")] == ["q/g1/v1>v2"]


def test_cut_replies_keep_marks_them(tmp_path):
    out = tmp_path / "out"
    summary = run_credit(write(tmp_path, finish(make_tree("q", TREE_N3), CUTS)), out,
                         cut_replies="keep")
    assert counts(summary) == {"generator": (2, 1, 2), "verifier": (5, 4, 2),
                               "refiner": (14, 13, 6)}
    assert summary["roles"]["refiner"]["cut"] == 2 and summary["cut_replies"] == "keep"
    gen = read_jsonl(out / "sft_generator.jsonl")
    assert [(r["id"], r.get("cut", False)) for r in gen] == [("q/g0", False), ("q/g1", True)]
    marks = {r["id"]: (r.get("chosen_cut", False), r.get("rejected_cut", False))
             for r in read_jsonl(out / "dpo_refiner.jsonl")}
    assert marks["q/g1/v1/r0>r2"] == (True, False) and marks["q/g1/v2/r0>r1"] == (False, True)
    assert marks["q/g1/v0/r0>r2"] == (False, False)
    assert read_jsonl(out / "dpo_generator.jsonl")[1]["chosen_cut"] is True


def test_trees_without_finish_load_as_finished_and_say_so_once(tmp_path):
    said = []
    out = tmp_path / "out"
    path = write(tmp_path, make_tree("a", TREE_N3), make_tree("b", TREE_N2))
    summary = run_credit(path, out, log=said.append)
    assert len(said) == 1
    assert said[0].startswith(f"{path}: 53 replies have no 'finish'") and "finished" in said[0]
    assert all(s["cut"] == 0 for s in summary["roles"].values())
    assert counts(summary)["refiner"] == (14 + 4, 13 + 4, 6 + 2)
    said.clear()
    run_credit(write(tmp_path, finish(make_tree("a", TREE_N3), set())), out, log=said.append)
    assert said == []
