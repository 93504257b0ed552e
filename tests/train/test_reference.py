"""Reference log-prob cache: equals a fresh computation; dataset/model changes invalidate it."""

import pytest
import torch

import malt_fast.train.reference as reference
from malt_fast.errors import MaltError
from malt_fast.model.llama import Llama, LlamaConfig
from malt_fast.train.losses import IGNORE


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return Llama(cfg)


def make_sequences(seed=0, n=5):
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = 6 + 3 * i  # different lengths: batches need padding
        ids = torch.randint(0, 53, (length,), generator=gen)
        labels = ids.clone()
        labels[: 3 + i % 2] = IGNORE
        seqs.append((ids.tolist(), labels))
    return seqs


def eager_logps(model, seqs):
    out = []
    with torch.no_grad():
        for ids, labels in seqs:
            ids = torch.tensor(ids)[None]
            labels = torch.as_tensor(labels)[None]
            logp = torch.log_softmax(model(ids).double()[:, :-1], -1)
            tok = logp.gather(2, ids[:, 1:, None])[..., 0]
            out.append(torch.where(labels[:, 1:] != IGNORE, tok, 0.0).sum().item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "dpo_verifier.jsonl"
    path.write_text('{"id": "a", "prompt": [], "chosen": "x", "rejected": "y"}\n')
    return path


def test_cached_equals_fresh_and_is_reused(dataset, monkeypatch):
    model, seqs = tiny_model(), make_sequences()
    first = reference.reference_logprobs(model, seqs, dataset, batch_size=2)
    torch.testing.assert_close(first.double(), eager_logps(model, seqs), atol=1e-4, rtol=0)
    files = list(dataset.parent.glob("*.reflogp-*.pt"))
    assert len(files) == 1 and not list(dataset.parent.glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("recomputed although the cache is valid")

    monkeypatch.setattr(reference, "compute_logprobs", boom)
    again = reference.reference_logprobs(model, seqs, dataset, batch_size=2)
    assert torch.equal(first, again)


def test_changed_dataset_or_model_invalidates(dataset, tmp_path):
    model, seqs = tiny_model(), make_sequences()
    cache = tmp_path / "cache"
    base = reference.reference_logprobs(model, seqs, dataset, cache_dir=cache)
    dataset.write_text(dataset.read_text() + '{"id": "b", "prompt": [], "chosen": "x", '
                                             '"rejected": "z"}\n')
    calls = []
    real = reference.compute_logprobs

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    reference.compute_logprobs = counting
    try:
        after_data = reference.reference_logprobs(model, seqs, dataset, cache_dir=cache)
        assert len(calls) == 1, "a changed dataset must not reuse the cache"
        torch.testing.assert_close(after_data, base)  # same model, same sequences: same values
        with torch.no_grad():
            model.lm_head.weight[3] += 0.5
        after_model = reference.reference_logprobs(model, seqs, dataset, cache_dir=cache)
        assert len(calls) == 2, "a changed model must not reuse the cache"
        torch.testing.assert_close(after_model.double(), eager_logps(model, seqs), atol=1e-4,
                                   rtol=0)
        assert not torch.allclose(after_model, base)
        assert len(list(cache.glob("*.pt"))) == 3
    finally:
        reference.compute_logprobs = real


def test_corrupt_cache_is_recomputed(dataset):
    model, seqs = tiny_model(), make_sequences()
    good = reference.reference_logprobs(model, seqs, dataset)
    (path,) = dataset.parent.glob("*.reflogp-*.pt")
    path.write_bytes(b"torn")
    again = reference.reference_logprobs(model, seqs, dataset)
    assert torch.equal(good, again)
    assert torch.load(path, weights_only=True)["logps"].shape == (len(seqs),)


def test_bad_input(tmp_path, dataset):
    model = tiny_model()
    with pytest.raises(MaltError, match="not found"):
        reference.reference_logprobs(model, make_sequences(), tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no sequences"):
        reference.reference_logprobs(model, [], dataset)
    with pytest.raises(ValueError, match="equal lengths"):
        reference.reference_logprobs(model, [([1, 2, 3], [1, 2])], dataset)
