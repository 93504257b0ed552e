"""Tree-packed training batches: same sequence log-probs, gradients, losses and weights as unpacked.

Tolerances (fp32, CPU): sequence log-probs 1e-4 absolute (sums of <= 40 token terms), gradients
1e-4; trainer metrics per step 1e-5 (relative, or absolute near 0); final adapters 1e-5 absolute.
"""

import json

import pytest
import torch

from malt_fast.model import load_model, load_tokenizer, save_model
from malt_fast.model.llama import Llama, LlamaConfig
from malt_fast.model.lora import LoRAConfig, add_adapter, adapter_parameters
from malt_fast.train.packing import pack_sequences
from malt_fast.train.trainer import TrainConfig, Trainer, policy_logprobs


def random_llama(vocab, seed=0, hidden=32, tie=False, std=0.1):
    """A tiny Llama with random (non-norm) weights of std `std` (shared by the train tests)."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=tie))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0, std)
    return model


def independent_logprob(model, prompt, completion):
    """One sequence alone, full logits, plain log-softmax: the textbook computation."""
    if not completion:
        return torch.zeros(())
    ids = torch.tensor([prompt + completion])
    logp = model(ids)[0].float().log_softmax(-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[rows, torch.tensor(completion)].sum()


def malt_like_sequences(g):
    """Two prompts with three completions each in (chosen, rejected) order, as the DPO pairs
    (c0 > c2, c1 > c2) give them (c2 listed twice); a third prompt with one pair; an empty one."""
    def toks(n):
        return torch.randint(0, 97, (n,), generator=g).tolist()
    seqs = []
    for plen in (23, 17):
        p, c = toks(plen), [toks(int(torch.randint(3, 12, (1,), generator=g))) for _ in range(3)]
        seqs += [(p, c[0]), (p, c[2]), (p, c[1]), (p, c[2])]
    p = toks(9)
    seqs += [(p, toks(5)), (p, toks(7)), (p, [])]
    return seqs


def test_pack_sequences_lays_out_each_prompt_and_completion_once():
    g = torch.Generator().manual_seed(0)
    seqs = malt_like_sequences(g)
    pb = pack_sequences(seqs)
    distinct = {}
    for p, c in seqs:
        distinct.setdefault(tuple(p), set()).add(tuple(c))
    expected = sum(len(p) + sum(len(c) for c in cs) for p, cs in distinct.items())
    assert pb.packed_tokens == expected
    assert pb.unpacked_tokens == sum(len(p) + len(c) for p, c in seqs)
    assert pb.input_ids.shape[0] == len(distinct)
    assert pb.n_completions == sum(len([c for c in cs if c]) for cs in distinct.values())
    assert pb.seq_segment[1] == pb.seq_segment[3]  # the repeated rejected completion
    assert pb.seq_segment[-1] == -1
    # a padding query attends only itself, so no row of the mask is empty
    assert pb.mask.any(-1).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_batch_equals_unpacked_and_independent(seed):
    g = torch.Generator().manual_seed(seed)
    model = random_llama(97, seed)
    add_adapter(model, "r", LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # a non-zero adapter, so its gradients are not trivially shaped
        for p in adapter_parameters(model, "r"):
            p.normal_(0, 0.1)
    seqs = malt_like_sequences(g)
    upstream = torch.randn(len(seqs), generator=g)
    params = adapter_parameters(model, "r")

    results = {}
    for mode in ("tree", "none", "independent"):
        model.zero_grad()
        if mode == "independent":
            seq = torch.stack([independent_logprob(model, p, c) for p, c in seqs])
        else:
            seq, ran = policy_logprobs(model, seqs, mode)
            assert seq.dtype == torch.float32
        (seq * upstream).sum().backward()
        results[mode] = seq.detach(), [p.grad.clone() for p in params]

    ref, ref_grads = results["independent"]
    for mode in ("tree", "none"):
        seq, grads = results[mode]
        assert (seq - ref).abs().max().item() <= 1e-4, mode
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), mode
    assert results["tree"][0][-1].item() == 0.0  # the empty completion


# ---------------------------------------------------------------- trainer: packing on vs off


@pytest.fixture(scope="module")
def tok(smollm_gguf):
    return load_tokenizer(smollm_gguf)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    model = random_llama(tok.vocab_size, 0, hidden=32, tie=True)
    path = tmp_path_factory.mktemp("tiny-packing") / "model"
    save_model(model, path)
    return path


def write_malt_sets(d, role="verifier"):
    """MALT-shaped: a verifier prompt (question + generator answer) with three critiques, pairs =
    positive x negative critiques; SFT rows = the positive critiques."""
    d.mkdir(parents=True, exist_ok=True)
    sft, dpo = [], []
    for i, (a, b) in enumerate([(2, 3), (4, 4), (7, 1), (5, 6)]):
        prompt = [{"role": "system", "content": "You are a careful math tutor."},
                  {"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} + {b} = {a + b + i % 2}."},
                  {"role": "user", "content": "Check the answer above."}]
        critiques = [f"Correct: {a} + {b} is {a + b}.", f"The sum {a + b} checks out.",
                     f"Wrong, it should be {a + b + 3}."]
        positive = [True, True, False] if i % 2 == 0 else [True, False, False]
        pos = [c for c, ok in zip(critiques, positive) if ok]
        neg = [c for c, ok in zip(critiques, positive) if not ok]
        sft += [{"id": f"q{i}", "prompt": prompt, "completion": c} for c in pos]
        dpo += [{"id": f"q{i}", "prompt": prompt, "chosen": c, "rejected": r}
                for c in pos for r in neg]
    for name, rows in ((f"sft_{role}.jsonl", sft), (f"dpo_{role}.jsonl", dpo)):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


TIMING = {"tokens_per_s", "step_s", "peak_mem_mib", "elapsed_s", "model_tokens"}


def test_trainer_packing_on_and_off_agree(model_dir, tok, tmp_path):
    from safetensors.torch import load_file

    write_malt_sets(tmp_path / "data")
    runs = {}
    for packing in ("tree", "none"):
        cfg = TrainConfig(roles=("verifier",), packing=packing, sft_epochs=2, dpo_epochs=2,
                          batch_size=3, sft_lr=1e-2, dpo_lr=5e-3, save_every=1000,
                          lora={"rank": 4, "alpha": 8.0}, tensorboard=False)
        out = tmp_path / packing
        Trainer(load_model(model_dir), tok, tmp_path / "data", out, cfg, log=lambda *_: None).run()
        metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
        adapter = load_file(out / "checkpoints" / "verifier" / "adapter_model.safetensors")
        cache = {p.name: torch.load(p, weights_only=True)["logps"]
                 for p in (out / "refcache").glob("*.pt")}
        runs[packing] = metrics, adapter, cache

    (m_tree, a_tree, c_tree), (m_none, a_none, c_none) = runs["tree"], runs["none"]
    assert [(m["phase"], m["step"]) for m in m_tree] == [(m["phase"], m["step"]) for m in m_none]
    assert {m["phase"] for m in m_tree} == {"sft", "dpo"}
    for a, b in zip(m_tree, m_none):
        assert a.keys() == b.keys()
        for k in a.keys() - TIMING - {"role", "phase"}:
            if k == "rewards/accuracy" and a["phase"] == "dpo" and a["step"] == 1:
                continue  # policy == reference: every reward is 0 up to rounding, ties are noise
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (a["phase"], a["step"], k)
        assert a["model_tokens"] < b["model_tokens"]  # the shared prompt ran once
    assert m_tree[-1]["rewards/margin"] != 0.0  # DPO did move the policy
    assert a_tree.keys() == a_none.keys()
    for k in a_tree:
        assert torch.allclose(a_tree[k], a_none[k], atol=1e-5, rtol=0), k
    # reference log-probs: each mode's own layout; the SFT states differ by rounding only
    assert len(c_tree) == len(c_none) == 1
    (r_tree,), (r_none,) = c_tree.values(), c_none.values()
    assert torch.allclose(r_tree, r_none, atol=1e-4, rtol=0)


def test_reference_follows_the_packing_and_is_cached_per_layout(model_dir, tok, tmp_path):
    """The reference is computed in the policy's layout, so each packing mode has its own cache
    file; in fp32 both equal the unpacked log-prob of each (chosen, rejected) pair."""
    write_malt_sets(tmp_path / "data")
    model = load_model(model_dir)
    add_adapter(model, "verifier", LoRAConfig(rank=4, alpha=8.0))
    refs = []
    for packing in ("tree", "none"):
        trainer = Trainer(model, tok, tmp_path / "data", tmp_path / "out",
                          TrainConfig(roles=("verifier",), packing=packing), log=lambda *_: None)
        data = trainer.phase_data("verifier", "dpo")
        batches = trainer.batch_order(data.groups, 1, "verifier", "dpo")
        refs.append(trainer.reference("verifier", data, batches))
    assert len(list((tmp_path / "out" / "refcache").glob("*.pt"))) == 2  # one per layout
    with torch.no_grad():
        direct = torch.stack([independent_logprob(model, p, c)
                              for pair in data.items for p, c in pair]).view(-1, 2)
    for r in refs:
        assert torch.allclose(r, direct, atol=1e-4, rtol=0)
