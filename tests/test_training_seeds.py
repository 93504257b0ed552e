"""train.seeds: the roles (and STaR) trained once per seed from the same trees, each evaluated;
the table averages over training x evaluation seeds; a killed seed resumes alone."""

import json
import shutil

from safetensors.torch import load_file

from malt_fast.pipeline import run_pipeline
from malt_fast.train.trainer import Trainer
from test_pipeline import ROLES, fast_tokenizer  # noqa: F401  (a fixture)
from test_rounds import assets, config, torch_threads  # noqa: F401  (fixtures)


def test_training_seeds(assets, fast_tokenizer, tmp_path, monkeypatch, torch_threads):
    cfg = config(assets, fast_tokenizer, tmp_path / "run", rounds=1,
                 credit={"cut_replies": "keep", "theta": 0.25},
                 evaluate={"seeds": [0], "questions": 2, "chains": 3, "star": True},
                 train={"batch_size": 2, "lora": {"rank": 2, "alpha": 4.0},
                        "tensorboard": False, "seeds": [5, 6]})
    trained = []
    real_run = Trainer.run

    def run(self):
        trained.append((self.out_dir.name, self.cfg.roles, self.cfg.seed))
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", run)
    printed = []
    results = run_pipeline(cfg, log=lambda *a: printed.append(" ".join(map(str, a))))
    train = tmp_path / "run" / "train"
    assert [(d, s) for d, _, s in trained] == [("seed-5", 5), ("seed-5", 5), ("seed-6", 6),
                                               ("seed-6", 6)]  # roles, then STaR, per seed
    # the same trees, different seeds: different adapters
    a, b = ({k: v for r in ROLES for k, v in load_file(
        train / f"seed-{s}" / "checkpoints" / r / "adapter_model.safetensors").items()}
        for s in (5, 6))
    assert a.keys() == b.keys() and any(not (a[k] == b[k]).all() for k in a)
    assert results["training_seeds"] == [5, 6]
    assert set(results["per_question"]["MALT"]) == {"5/0", "6/0"}
    assert set(results["per_question"]["STaR+MV@3"]) == {"5/0", "6/0"}
    assert set(results["per_question"]["SA"]) == {"0"}
    assert len(results["methods"]["MALT"]["per_seed"]) == 2
    assert len(results["methods"]["SA"]["per_seed"]) == 1
    malt_ma = next(c for c in results["comparisons"] if (c["a"], c["b"]) == ("MALT", "MA"))
    assert malt_ma["units"] == 2 * 2  # 2 training seeds x 2 questions, each paired with MA's
    assert any("2 training × 1 evaluation seeds" in line for line in printed)

    # seed 6 killed before its export, its evaluation not done: only seed 6 is redone
    shutil.rmtree(train / "seed-6" / "checkpoints")
    shutil.rmtree(tmp_path / "run" / "eval")
    trained.clear()
    again = run_pipeline(cfg, log=lambda *a: None)
    assert [(d, s) for d, _, s in trained] == [("seed-6", 6), ("seed-6", 6)]  # roles, STaR
    assert again["per_question"]["MALT"] == results["per_question"]["MALT"]  # same weights
    assert json.loads((tmp_path / "run" / "eval" / "results.json").read_text())[
        "training_seeds"] == [5, 6]
