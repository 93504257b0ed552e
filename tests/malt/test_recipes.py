"""Credit recipes on hand-worked trees: which rows and pairs each emits, and the copy share.

Tree A (gold 72, n = 2; 1 = a refinement with the gold answer):
    g0 "Final Answer: 71" (wrong)
        v0 "Verdict: incorrect" (flags it: matches)      refinements [1, 0]  mean 1/2
        v1 "Verdict: correct"   (misses it)              refinements [0, 0]  mean 0
    g1 "Final Answer: 72" (right)
        v0 "Verdict: correct"   (matches)                refinements [1, 1]  mean 1
        v1 "Verdict: incorrect" (flags a right one)      refinements [1, 0]  mean 1/2

paper:       V(v) = refinement mean: g0 {1/2, 0} (no positive), g1 {1, 1/2} -> 1 pair (g1 v0>v1)
correction:  w = 1: V(v) = match: g0 {1, 0}, g1 {1, 0} -> verifier pairs g0 v0>v1, g1 v0>v1
             V(g) stays the refinements' mean: g0 (1/2 + 0)/2 = 1/4, g1 (1 + 1/2)/2 = 3/4
refiner rows: under the wrong g0: SFT g0v0r0 (the fix-up), pair g0v0 r0>r1 (fix > kept wrong);
             under the right g1: SFT g1v0r0, g1v0r1, g1v1r0 (copies), pair g1v1 r0>r1
"""

import json

import pytest

from malt_fast.errors import MaltError
from malt_fast.malt.credit import Recipe, cap_copies, run_credit


def make_tree(tid, gens):
    """gens: [(generation answer, [(verdict, [leaf ok, ...]), ...]), ...]"""
    done = {"finish": "stop"}
    return {"id": tid, "dataset": "gsm8k", "question": f"Question {tid}?", "gold": "72",
            "generations": [
                {"text": f"{tid} solution {i}.\nFinal Answer: {ans}", **done, "verifications": [
                    {"text": f"{tid} critique {i}.{j}.\nVerdict: {verdict}", **done,
                     "refinements": [
                        {"text": f"{tid} fix {i}.{j}.{k}\nFinal Answer: {72 if ok else 71}",
                         **done}
                        for k, ok in enumerate(leaves)]}
                    for j, (verdict, leaves) in enumerate(vers)]}
                for i, (ans, vers) in enumerate(gens)]}


TREE_A = [(71, [("incorrect", [1, 0]), ("correct", [0, 0])]),
          (72, [("correct", [1, 1]), ("incorrect", [1, 0])])]


def credit(tmp_path, trees, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps(make_tree(f"q{i}", t)) + "\n" for i, t in enumerate(trees)))
    out = tmp_path / "out"
    summary = run_credit(path, out, **kw)
    rows = {f"{kind}_{role}": [json.loads(x) for x in (out / f"{kind}_{role}.jsonl").read_text()
                               .splitlines()]
            for kind in ("sft", "dpo") for role in ("generator", "verifier", "refiner")}
    scored = [json.loads(x) for x in (out / "trees.jsonl").read_text().splitlines()]
    return summary, rows, scored


def ids(rows):
    return [r["id"] for r in rows]


def test_paper_recipe_keeps_every_refiner_row(tmp_path):
    summary, rows, scored = credit(tmp_path, [TREE_A])
    assert ids(rows["dpo_verifier"]) == ["q0/g1/v0>v1"]
    assert ids(rows["sft_refiner"]) == ["q0/g0/v0/r0", "q0/g1/v0/r0", "q0/g1/v0/r1",
                                        "q0/g1/v1/r0"]
    assert ids(rows["dpo_refiner"]) == ["q0/g0/v0/r0>r1", "q0/g1/v1/r0>r1"]
    assert not any("_under_right" in r for r in rows["sft_refiner"] + rows["dpo_refiner"])
    g = scored[0]["generations"]
    assert [x["correct"] for x in g] == [False, True]
    assert [v["verdict"] for v in g[0]["verifications"]] == ["incorrect", "correct"]
    c = summary["correction"]
    assert (c["generations_wrong"], c["generations_right"], c["wrong_flagged"],
            c["right_flagged"]) == (1, 1, 1, 1)
    assert (c["fixes"], c["kept_wrong"], c["kept_right"], c["broken"]) == (1, 3, 3, 1)


def test_correction_values_critiques_by_their_verdict(tmp_path):
    summary, rows, scored = credit(tmp_path, [TREE_A], recipe=Recipe("correction"))
    g = scored[0]["generations"]
    assert [[v["value"] for v in x["verifications"]] for x in g] == [[1, 0], [1, 0]]
    assert [x["value"] for x in g] == pytest.approx([1 / 4, 3 / 4])  # the paper's value
    assert ids(rows["dpo_verifier"]) == ["q0/g0/v0>v1", "q0/g1/v0>v1"]
    assert ids(rows["sft_verifier"]) == ["q0/g0/v0", "q0/g1/v0"]
    assert ids(rows["dpo_generator"]) == ["q0/g1>g0"]
    # copy_share 0.2 with one row under the wrong generation: int(0.2 * 1 / 0.8) = 0 copies
    assert ids(rows["sft_refiner"]) == ["q0/g0/v0/r0"]
    assert ids(rows["dpo_refiner"]) == ["q0/g0/v0/r0>r1"]
    assert summary["correction"]["refiner_rows_under_right"]["sft"] == \
        {"under_right": 3, "kept": 0, "under_wrong": 1}


def test_verdict_weight_mixes_in_the_refinements(tmp_path):
    # g0 wrong; v0 flags it but no refinement fixes it; v1 misses it, one of two fixes it.
    tree = [(71, [("incorrect", [0, 0]), ("correct", [1, 0])])]
    for w, values in ((1.0, [1, 0]), (0.5, [0.5, 0.25]), (0.0, [0, 0.5])):
        _, _, scored = credit(tmp_path / f"w{w}", [tree],
                              recipe=Recipe("correction", verdict_weight=w))
        got = [v["value"] for v in scored[0]["generations"][0]["verifications"]]
        assert got == pytest.approx(values)
        # strict threshold: 1/2 is negative
        assert [v["positive"] for v in scored[0]["generations"][0]["verifications"]] == \
            [x > 0.5 for x in values]


def test_copy_share_caps_rows_under_right_generations(tmp_path):
    # four trees A: 4 fix-ups under wrong generations, 12 copies; share 0.2 -> int(0.2*4/0.8) = 1
    summary, rows, _ = credit(tmp_path, [TREE_A] * 4, recipe=Recipe("correction", copy_share=0.2),
                              seed=3)
    under_right = [r for r in rows["sft_refiner"] if "/g1/" in r["id"]]
    assert len(rows["sft_refiner"]) == 5 and len(under_right) == 1
    assert len(under_right) / len(rows["sft_refiner"]) <= 0.2
    pairs_right = [r for r in rows["dpo_refiner"] if "/g1/" in r["id"]]
    assert len(rows["dpo_refiner"]) == 5 and len(pairs_right) == 1
    # share 0.5: as many copies as fix-ups; the sample is seeded (reruns equal)
    a = credit(tmp_path / "a", [TREE_A] * 4, recipe=Recipe("correction", copy_share=0.5), seed=3)
    b = credit(tmp_path / "b", [TREE_A] * 4, recipe=Recipe("correction", copy_share=0.5), seed=3)
    assert len(a[1]["sft_refiner"]) == 8 and a[1]["sft_refiner"] == b[1]["sft_refiner"]


def test_cap_copies_by_hand():
    rows = [{"id": i, "_under_right": i % 2 == 0} for i in range(10)]  # 5 copies, 5 others
    out, counts = cap_copies(rows, 0.25, "k")
    assert counts == {"under_right": 5, "kept": 1, "under_wrong": 5}
    assert len(out) == 6 and [r["id"] for r in out if r["id"] % 2] == [1, 3, 5, 7, 9]
    assert all("_under_right" not in r for r in out)
    assert len(cap_copies(rows, 0.0, "k")[0]) == 5
    assert len(cap_copies(rows, 1.0, "k")[0]) == 10


@pytest.mark.parametrize("kw,message", [({"name": "fancy"}, "recipe: expected one of"),
                                        ({"verdict_weight": 1.5}, "verdict_weight"),
                                        ({"copy_share": 1.0}, "copy_share")])
def test_bad_recipes(kw, message):
    with pytest.raises(MaltError, match=message):
        Recipe(**{"name": "correction", **kw})
