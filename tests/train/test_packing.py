"""Tree-packed sequence log-probs and gradients equal the unpacked computation."""

import random

import pytest
import torch

from malt_fast.model.llama import Llama, LlamaConfig
from malt_fast.train.packing import Segment, pack_tree, packed_token_logprobs, sequence_logprobs


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def random_tree(rng, n=2, depth=3):
    """Prompt root, then n children per node for `depth` levels (G -> V -> R shaped)."""
    segs = [Segment([rng.randrange(101) for _ in range(rng.randint(3, 9))])]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for parent in frontier:
            for _ in range(n):
                segs.append(Segment([rng.randrange(101) for _ in range(rng.randint(1, 7))],
                                    parent=parent, scored=True))
                nxt.append(len(segs) - 1)
        frontier = nxt
    return segs


def unpacked_logprob(model, segs, i):
    chain, j = [], i
    while j >= 0:
        chain.append(j)
        j = segs[j].parent
    prefix = [t for k in reversed(chain[1:]) for t in segs[k].tokens]
    own = segs[i].tokens
    ids = torch.tensor([prefix + own])
    logp = model(ids)[0].float().log_softmax(-1)
    rows = torch.arange(len(prefix) - 1, len(prefix) + len(own) - 1)
    return logp[rows, torch.tensor(own)].sum()


@pytest.mark.parametrize("seed,n,depth", [(0, 2, 3), (1, 3, 2), (2, 1, 4)])
def test_packed_equals_unpacked(seed, n, depth):
    rng = random.Random(seed)
    model = tiny_model(seed)
    segs = random_tree(rng, n, depth)
    packed = pack_tree(segs)
    upstream = torch.randn(len(packed.scored), generator=torch.Generator().manual_seed(seed))

    seq = sequence_logprobs(packed_token_logprobs(model, packed), packed)
    (seq * upstream).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.stack([unpacked_logprob(model, segs, i) for i in packed.scored])
    (ref * upstream).sum().backward()

    # fp32, tolerance 1e-4 absolute on log-probs (sums of ≤ 30 token terms) and 1e-4 on grads
    assert (seq - ref).abs().max().item() <= 1e-4
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-4, rtol=1e-3), k


def test_packing_computes_shared_prefix_once():
    segs = [Segment([1] * 100), Segment([2] * 10, 0, True), Segment([3] * 10, 0, True)]
    packed = pack_tree(segs)
    assert packed.input_ids.numel() == 120  # unpacked: 2 × 110 = 220 tokens
    assert packed.positions[110:].tolist() == list(range(100, 110))
    assert not packed.mask[110:, 100:110].any()  # the second child never sees the first
    assert packed.hidden_index[0].item() == 99 and packed.hidden_index[10].item() == 99


def test_bad_trees():
    with pytest.raises(ValueError, match="parent 1 must come earlier"):
        pack_tree([Segment([1]), Segment([2], parent=1)])
    with pytest.raises(ValueError, match="needs a parent"):
        pack_tree([Segment([1], scored=True)])
