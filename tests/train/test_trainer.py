"""SFT lowers completion NLL, DPO raises the margin, generator DPO is opt-in, resume is exact
(LoRA and full fine-tuning)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from malt_fast.model import load_model, load_tokenizer, save_model
from malt_fast.model.lora import set_adapter
from malt_fast.train.losses import completion_mask, token_logprobs
from test_train_packing import random_llama
from malt_fast.train.trainer import TrainConfig, Trainer, collate, encode_pair, encode_parts

QUESTIONS = [f"What is {a} plus {b}?" for a, b in [(2, 3), (4, 4), (7, 1), (5, 6), (9, 2), (3, 8)]]


@pytest.fixture(scope="module")
def tok(smollm_gguf):
    return load_tokenizer(smollm_gguf)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    model = random_llama(tok.vocab_size, tie=True, std=0.05)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, path)
    return path


def write_sets(d, roles=("generator", "verifier", "refiner")):
    d.mkdir(parents=True, exist_ok=True)
    for role in roles:
        with open(d / f"sft_{role}.jsonl", "w") as f:
            for i, q in enumerate(QUESTIONS):
                f.write(json.dumps({"id": f"q{i}", "prompt": [{"role": "user", "content": q}],
                                    "completion": f"The answer is {i}."}) + "\n")
        with open(d / f"dpo_{role}.jsonl", "w") as f:
            for i, q in enumerate(QUESTIONS):
                f.write(json.dumps({"id": f"q{i}", "prompt": [{"role": "user", "content": q}],
                                    "chosen": f"So it is {i}.", "rejected": "I refuse."}) + "\n")


def nll(model, tok, rows, role):
    set_adapter(model, role)
    seqs = [encode_pair(tok, [{"role": "user", "content": q}], c, 256) for q, c in rows]
    ids, labels = collate(seqs, tok.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(model, ids, labels)
    m = completion_mask(labels)
    return -(logp * m).sum().item() / m.sum().item()


def test_encode_pair_labels_only_the_completion(tok):
    ids, labels = encode_pair(tok, [{"role": "user", "content": "Hi"}], "Hello!", 512)
    head = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[:len(head)] == head and all(x == -100 for x in labels[:len(head)])
    text = tok.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert text.startswith("Hello!<|im_end|>")


def test_encode_pair_completion_starting_with_whitespace(tok):
    """The template's newline and a leading space merge when re-encoded together; the prompt
    ids must still be exactly the rollout's, and the labels must decode to the completion."""
    prompt = [{"role": "user", "content": "Hi"}]
    head = tok.apply_chat_template(prompt)
    for completion in (" 1", "\n\nFinal Answer: 3", "  two spaces"):
        ids, labels = encode_pair(tok, prompt, completion, 512)
        assert ids[:len(head)] == head and all(x == -100 for x in labels[:len(head)])
        text = tok.decode([t for t in labels if t != -100], skip_special_tokens=False)
        assert text.startswith(completion + "<|im_end|>")


def test_a_cut_reply_is_an_open_turn(tok):
    """closed=False (a reply cut by the token budget): the same tokens up to the content's end,
    and no end-of-turn token after it to learn."""
    prompt = [{"role": "user", "content": "Hi"}]
    for completion in ("1. 4 * 1 = 4.\n2. 4 + 1 =", " 5 +", "Final Answer:"):
        head, closed = encode_parts(tok, prompt, completion, 512)
        head_open, open_ = encode_parts(tok, prompt, completion, 512, closed=False)
        assert head_open == head and closed[:len(open_)] == open_
        assert tok.decode(open_, skip_special_tokens=False) == completion
        assert tok.decode(closed[len(open_):], skip_special_tokens=False) == "<|im_end|>\n"
        assert not set(open_) & set(tok.eos_token_ids)


def test_trainer_reads_cut_marks(tok, tmp_path):
    """Rows credit wrote with cut_replies: keep train their cut sides without the end-of-turn
    (labels end at the content); the other sides keep theirs."""
    d = tmp_path / "data"
    d.mkdir()
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    rows = [{"id": "a", "prompt": prompt, "completion": "2 + 3 = 5.", "cut": True},
            {"id": "b", "prompt": prompt, "completion": "It is 5."}]
    (d / "sft_verifier.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pair = {"id": "a>b", "prompt": prompt, "chosen": "2 + 3 = 5.", "rejected": "2 + 3 =",
            "rejected_cut": True}
    (d / "dpo_verifier.jsonl").write_text(json.dumps(pair) + "\n")
    trainer = Trainer(random_llama(tok.vocab_size), tok, d, tmp_path / "out",
                      TrainConfig(roles=("verifier",)), log=lambda *_: None)
    eot = set(tok.eos_token_ids)
    (_, cut), (_, done) = trainer.phase_data("verifier", "sft").items
    assert cut[-1] not in eot and not set(cut) & eot
    assert eot & set(done[-2:])
    ((_, chosen), (_, rejected)), = trainer.phase_data("verifier", "dpo").items
    assert eot & set(chosen[-2:]) and not set(rejected) & eot


def test_sft_then_dpo_per_role(model_dir, tok, tmp_path):
    write_sets(tmp_path / "data")
    model = load_model(model_dir)
    cfg = TrainConfig(sft_epochs=4, dpo_epochs=2, batch_size=3, sft_lr=2e-2, dpo_lr=3e-3,
                      lora={"rank": 8, "alpha": 16.0}, save_every=1000)
    trainer = Trainer(model, tok, tmp_path / "data", tmp_path / "out", cfg, log=lambda *_: None)
    sft_rows = [(q, f"The answer is {i}.") for i, q in enumerate(QUESTIONS)]
    before = nll(model, tok, sft_rows, None)
    adapters = trainer.run()
    assert set(adapters) == {"generator", "verifier", "refiner"}
    for role in adapters:
        assert (adapters[role] / "adapter_model.safetensors").is_file()
    assert nll(model, tok, sft_rows, "generator") < before - 0.5
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    phases = {(m["role"], m["phase"]) for m in metrics}
    assert phases == {("generator", "sft"), ("verifier", "sft"), ("verifier", "dpo"),
                      ("refiner", "sft"), ("refiner", "dpo")}  # no generator DPO by default
    dpo = [m for m in metrics if m["role"] == "verifier" and m["phase"] == "dpo"]
    assert dpo[-1]["rewards/margin"] > dpo[0]["rewards/margin"]
    assert dpo[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)  # policy starts at reference
    assert all(k in dpo[0] for k in ("loss", "rewards/accuracy", "lr", "tokens_per_s"))


def test_generator_dpo_when_enabled(model_dir, tok, tmp_path):
    write_sets(tmp_path / "data", roles=("generator",))
    cfg = TrainConfig(roles=("generator",), generator_dpo=True, batch_size=6, save_every=1000)
    Trainer(load_model(model_dir), tok, tmp_path / "data", tmp_path / "out", cfg,
            log=lambda *_: None).run()
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert {m["phase"] for m in metrics} == {"sft", "dpo"}


def train_cmd(model_dir, tok_path, data, out, finetune="lora"):
    cfg = {"model": str(model_dir), "tokenizer": str(tok_path), "data": str(data), "out": str(out),
           "train": {"roles": ["verifier"], "finetune": finetune, "sft_epochs": 6,
                     "dpo_epochs": 6, "batch_size": 1, "save_every": 3,
                     "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1}}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return [sys.executable, "-m", "malt_fast.cli", "train", str(path)]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_killed_run_resumes_to_the_same_weights(model_dir, tok, smollm_gguf, tmp_path, finetune):
    from safetensors.torch import load_file

    write_sets(tmp_path / "data", roles=("verifier",))
    ref_out, cut_out = tmp_path / "straight", tmp_path / "killed"
    cmd = [train_cmd(model_dir, smollm_gguf, tmp_path / "data", out, finetune)
           for out in (ref_out, cut_out)]
    subprocess.run(cmd[0], check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(cmd[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut_out / "state" / "verifier-dpo.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-DPO: after its first checkpoint, before its end
    proc.wait()
    assert state.exists() and not (cut_out / "state" / "verifier-dpo.done").exists()
    subprocess.run(cmd[1], check=True, capture_output=True, timeout=300)
    weights = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    a = load_file(ref_out / "checkpoints" / "verifier" / weights)
    b = load_file(cut_out / "checkpoints" / "verifier" / weights)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_training_inputs(model_dir, tok, tmp_path):
    from malt_fast.errors import MaltError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft_generator.jsonl").write_text('{"prompt": "not a list", "completion": "x"}\n')
    trainer = Trainer(load_model(model_dir), tok, tmp_path / "data", tmp_path / "out",
                      TrainConfig(roles=("generator",)), log=lambda *_: None)
    with pytest.raises(MaltError, match=r"sft_generator.jsonl:1: field 'prompt' must be a chat"):
        trainer.run()
    trainer.cfg = TrainConfig(roles=("verifier",))
    with pytest.raises(MaltError, match=r"sft_verifier.jsonl: no such file"):
        trainer.run()
