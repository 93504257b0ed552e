"""Per-step metrics (metrics.jsonl and TensorBoard) and the progress bar."""

import json

import pytest
from test_train_packing import random_llama, write_malt_sets

from malt_fast.model import load_model, load_tokenizer, save_model
from malt_fast.train.trainer import TrainConfig, Trainer, encode_parts


@pytest.fixture(scope="module")
def tok(smollm_gguf):
    return load_tokenizer(smollm_gguf)


def test_metrics_tensorboard_and_progress(tok, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save_model(random_llama(tok.vocab_size, 2, hidden=32, tie=True), tmp_path / "model")
    write_malt_sets(tmp_path / "data")
    cfg = TrainConfig(roles=("verifier",), sft_epochs=1, dpo_epochs=1, batch_size=3,
                      sft_lr=1e-2, dpo_lr=4e-3, warmup_steps=2, save_every=100,
                      lora={"rank": 4, "alpha": 8.0})
    out = tmp_path / "out"
    Trainer(load_model(tmp_path / "model"), tok, tmp_path / "data", out, cfg,
            log=lambda *_: None).run()
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]

    for phase, base_lr in (("sft", cfg.sft_lr), ("dpo", cfg.dpo_lr)):
        recs = [m for m in metrics if m["phase"] == phase]
        total = recs[0]["steps"]
        assert [m["step"] for m in recs] == list(range(1, total + 1))
        for m in recs:  # linear warm-up, then linear decay to 0, evaluated at the step taken
            s = m["step"] - 1
            assert m["lr"] == pytest.approx(
                base_lr * min(1.0, (s + 1) / cfg.warmup_steps) * (1 - s / total))
            assert m["tokens_per_s"] > 0 and m["step_s"] > 0 and m["peak_mem_mib"] > 10
            assert m["model_tokens"] <= m["tokens"]  # packed: each shared prompt once
        # tokens = unpacked sequence lengths; one epoch sees every row once
        rows = [json.loads(line) for line in open(tmp_path / "data" / f"{phase}_verifier.jsonl")]
        comps = ["completion"] if phase == "sft" else ["chosen", "rejected"]
        expected = sum(len(p) + len(c) for r in rows for k in comps
                       for p, c in [encode_parts(tok, r["prompt"], r[k], cfg.max_len)])
        assert sum(m["tokens"] for m in recs) == expected
    dpo = [m for m in metrics if m["phase"] == "dpo"]
    for k in ("loss", "rewards/margin", "rewards/accuracy", "rewards/chosen", "rewards/rejected"):
        assert all(k in m for m in dpo), k
    for m in dpo:
        assert m["rewards/margin"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"],
                                                    abs=1e-6)

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    for phase in ("sft", "dpo"):
        recs = [m for m in metrics if m["phase"] == phase]
        for key in ("loss", "lr", "tokens_per_s"):
            scalars = acc.Scalars(f"verifier/{phase}/{key}")
            assert [s.step for s in scalars] == [m["step"] for m in recs]
            assert [s.value for s in scalars] == pytest.approx([m[key] for m in recs], rel=1e-6)
    assert "verifier/dpo/rewards/margin" in acc.Tags()["scalars"]

    err = capsys.readouterr().err
    assert "verifier sft" in err and "verifier dpo" in err
    assert f"{total}/{total} [" in err and "<" in err  # steps done/total, elapsed<remaining (ETA)
