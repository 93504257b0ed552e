"""Reference log-prob cache: equals a fresh computation (and the textbook log-softmax); a changed
dataset, model, pairs, micro-batches or layout picks a new file; a torn file is recomputed."""

import pytest
import torch

import malt_fast.train.reference as reference
from malt_fast.errors import MaltError
from malt_fast.model.llama import Llama, LlamaConfig
from malt_fast.train.trainer import policy_logprobs


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return Llama(cfg)


def make_pairs(seed=0, n=5):
    """((prompt, chosen), (prompt, rejected)) token id pairs of different lengths."""
    gen = torch.Generator().manual_seed(seed)

    def toks(k):
        return torch.randint(0, 53, (k,), generator=gen).tolist()

    pairs = []
    for i in range(n):
        prompt = toks(3 + i % 2)
        pairs.append(((prompt, toks(3 + 2 * i)), (prompt, toks(2 + i))))
    return pairs


def textbook_logps(model, pairs):
    """fp64 log-softmax of full logits, one sequence at a time."""
    out = []
    with torch.no_grad():
        for pair in pairs:
            row = []
            for prompt, completion in pair:
                ids = torch.tensor([prompt + completion])
                logp = torch.log_softmax(model(ids)[0].double(), -1)
                at = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
                row.append(logp[at, torch.tensor(completion)].sum().item())
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


class Counting:
    """`batch_logprobs` over the policy's function, counting its calls."""

    def __init__(self, model, pairs, packing="tree"):
        self.model, self.pairs, self.packing, self.calls = model, pairs, packing, 0

    def __call__(self, idx):
        self.calls += 1
        seqs = [s for i in idx for s in self.pairs[i]]
        return idx, policy_logprobs(self.model, seqs, self.packing)[0]


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "dpo_verifier.jsonl"
    path.write_text('{"id": "a", "prompt": [], "chosen": "x", "rejected": "y"}\n')
    return path


BATCHES = [[3, 0], [4, 1], [2]]


def ref(fn, pairs, dataset, batches=BATCHES, key="m", layout="packing=tree", **kw):
    return reference.reference_logprobs(fn, pairs, batches, dataset, key, layout, **kw)


def test_cached_equals_fresh_and_is_reused(dataset):
    model, pairs = tiny_model(), make_pairs()
    fn = Counting(model, pairs)
    first = ref(fn, pairs, dataset)
    assert fn.calls == len(BATCHES) and first.shape == (5, 2) and first.dtype == torch.float32
    torch.testing.assert_close(first.double(), textbook_logps(model, pairs), atol=1e-4, rtol=0)
    files = list(dataset.parent.glob("*.reflogp-*.pt"))
    assert len(files) == 1 and not list(dataset.parent.glob("*.tmp"))
    again = ref(fn, pairs, dataset)
    assert fn.calls == len(BATCHES), "recomputed although the cache is valid"
    assert torch.equal(first, again)


@pytest.mark.parametrize("change", ["dataset", "model", "pairs", "batches", "layout"])
def test_any_change_invalidates(dataset, tmp_path, change):
    model, pairs = tiny_model(), make_pairs()
    cache = tmp_path / "cache"
    fn = Counting(model, pairs)
    base = ref(fn, pairs, dataset, cache_dir=cache)
    calls = fn.calls
    kw = {"cache_dir": cache}
    if change == "dataset":
        dataset.write_text(dataset.read_text() + '{"id": "b"}\n')
    elif change == "model":
        kw["key"] = "m2"
    elif change == "pairs":
        pairs = make_pairs(seed=1)
        fn.pairs = pairs
    elif change == "batches":
        kw["batches"] = [[0, 1], [2, 3], [4]]
    else:
        kw["layout"] = "packing=none"
    after = ref(fn, pairs, dataset, **kw)
    assert fn.calls == calls + len(kw.get("batches", BATCHES)), f"a changed {change} reused"
    assert len(list(cache.glob("*.pt"))) == 2
    if change in ("dataset", "model", "batches", "layout"):  # same sequences, same values (fp32)
        torch.testing.assert_close(after, base, atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(after, base)


def test_corrupt_cache_is_recomputed(dataset):
    model, pairs = tiny_model(), make_pairs()
    fn = Counting(model, pairs)
    good = ref(fn, pairs, dataset)
    (path,) = dataset.parent.glob("*.reflogp-*.pt")
    path.write_bytes(b"torn")
    again = ref(fn, pairs, dataset)
    assert fn.calls == 2 * len(BATCHES) and torch.equal(good, again)
    assert torch.load(path, weights_only=True)["logps"].shape == (len(pairs), 2)


def test_bad_input(tmp_path, dataset):
    model, pairs = tiny_model(), make_pairs()
    fn = Counting(model, pairs)
    with pytest.raises(MaltError, match="not found"):
        ref(fn, pairs, tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no pairs"):
        ref(fn, [], dataset, batches=[])
    for batches in ([[0, 1], [2, 3]], [[0, 1, 2], [2, 3, 4]], [[0, 1, 2, 3, 4, 5]]):
        with pytest.raises(ValueError, match="exactly once"):
            ref(fn, pairs, dataset, batches=batches)
    assert fn.calls == 0
