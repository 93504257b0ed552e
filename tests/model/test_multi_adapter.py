"""MultiAdapterView: one batch, each row through its own adapter (or none), against each row run
alone through `merged_model(model, name)` and the batch through `AdapterView(model, name)`.

A random 2-layer Llama with three adapters of odd ranks 3, 5, 7 on different projection sets
(random nonzero B, so every update is real). Rows are routed in shuffled order, with repeats, an
absent adapter, None rows and unrouted padding rows; a left-padded prefill (T > 1, under a mask)
and a KV-cache decode step (T = 1). Both backends: "torch" (the CPU grouped matmuls) and
"triton" (the kernels, interpreted on CPU). fp32 agrees to ~1e-6; the check is 2e-5 against
logits that the adapters move by > 0.02, so a row given the wrong adapter fails 1000-fold.
"""

import pytest
import torch

from malt_fast.model.llama import KVCache, Llama, LlamaConfig
from malt_fast.model.lora import (AdapterView, LoRAConfig, MultiAdapterView, add_adapter,
                                  adapter_parameters, lora_modules, merged_model, set_adapter)

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
NAMES = [None, "generator", "verifier", "refiner"]
# shuffled, repeated; "generator" absent from the first
ROUTINGS = [[2, 0, 3, 2, 0, 3, 2], [1, 3, 0, 1, 2, 2, 3]]
PADS = [0, 3, 1, 0, 5, 2, 4]  # left padding of each row's prompt
B, T = len(PADS), 9
BACKENDS = ["torch", "triton"]


def build(dtype=torch.float32) -> Llama:
    torch.manual_seed(0)
    model = Llama(CFG).to(dtype).eval()
    add_adapter(model, "generator", LoRAConfig(rank=3, alpha=6))
    add_adapter(model, "verifier", LoRAConfig(rank=5, alpha=4,
                                              targets=("q_proj", "v_proj", "down_proj")))
    add_adapter(model, "refiner", LoRAConfig(rank=7, alpha=14,
                                             targets=("k_proj", "o_proj", "gate_proj", "up_proj")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in NAMES[1:]:
            for p in adapter_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    set_adapter(model, "verifier")  # whatever training left active
    return model


def batch():
    """Left-padded prompts [B, T], their mask [B, 1, T, T] and positions [B, T]."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    valid = torch.arange(T)[None, :] >= torch.tensor(PADS)[:, None]
    pos = (torch.arange(T)[None, :] - torch.tensor(PADS)[:, None]).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # a padding query still sees itself (no all-masked row, which would be NaN)
    mask = causal[None, None] & (valid[:, None, None, :] | torch.eye(T, dtype=torch.bool))
    return ids, valid, mask, pos


def decode(model, ids, valid, pos, next_ids):
    """Logits of a cached prefill [B, T, V] and of one decode step after it [B, V]."""
    cache = KVCache(CFG, ids.shape[0], T + 1, next(model.parameters()).dtype, "cpu")
    cache.append_valid(valid)
    first = model(ids, pos, cache=cache)
    cache.append_valid(torch.ones(ids.shape[0], 1, dtype=torch.bool))
    return first, model(next_ids, pos[:, -1:] + 1, cache=cache)[:, -1]


@pytest.fixture(scope="module")
def fp32():
    """The model and, per row and adapter name, the row's logits alone through merged_model:
    prefill [T - pad, V] and the decode step's [V]."""
    model = build()
    ids, valid, mask, pos = batch()
    next_ids = torch.randint(0, CFG.vocab_size, (B, 1), generator=torch.Generator().manual_seed(3))
    ref = {}
    with torch.no_grad():
        for name in NAMES:
            merged = merged_model(model, name)
            for i, pad in enumerate(PADS):
                row = ids[i:i + 1, pad:]
                pre, step = decode(merged, row, torch.ones_like(row, dtype=torch.bool),
                                   torch.arange(T - pad)[None], next_ids[i:i + 1])
                ref[name, i] = pre[0], step[0]
    # the adapters matter: each row's references differ by far more than the tolerance
    for i in range(B):
        for n1 in NAMES:
            for n2 in NAMES:
                if n1 != n2:
                    assert (ref[n1, i][1] - ref[n2, i][1]).abs().max() > 0.02
    return model, (ids, valid, mask, pos, next_ids), ref


# the interpreted kernels cost ~1 s a forward: one routing there (test_lora_grouped.py has the
# kernels' other cases)
@pytest.mark.parametrize("routing,backend", [(ROUTINGS[0], "torch"), (ROUTINGS[1], "torch"),
                                             (ROUTINGS[1], "triton")],
                         ids=["absent-torch", "all-torch", "all-triton"])
def test_each_row_equals_its_adapter_alone(fp32, routing, backend):
    model, (ids, valid, mask, pos, next_ids), ref = fp32
    view = MultiAdapterView(model, NAMES, backend=backend)
    assert [view.index(n) for n in NAMES] == [0, 1, 2, 3]
    view.route(routing)
    with torch.no_grad():
        masked = view(ids, pos, mask=mask)  # prefill under a mask, no cache
        pre, step = decode(view, ids, valid, pos, next_ids)  # cache= prefill, then T == 1
        per_name = {n: decode(AdapterView(model, n), ids, valid, pos, next_ids)
                    for n in set(NAMES[k] for k in routing)}
    for i, k in enumerate(routing):
        name, pad = NAMES[k], PADS[i]
        want_pre, want_step = ref[name, i]
        for got in (masked, pre):
            torch.testing.assert_close(got[i, pad:], want_pre, rtol=0, atol=2e-5)
        torch.testing.assert_close(step[i], want_step, rtol=0, atol=2e-5)
        torch.testing.assert_close(pre[i, pad:], per_name[name][0][i, pad:], rtol=0, atol=2e-5)
        torch.testing.assert_close(step[i], per_name[name][1][i], rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unrouted_padding_rows_get_the_base(fp32, backend):
    model, (ids, valid, mask, pos, next_ids), ref = fp32
    view = MultiAdapterView(model, NAMES, backend=backend)
    view.route([3, 1, 2, 2])  # a fixed-shape step: rows 4..6 are padding
    with torch.no_grad():
        out = view(ids, pos, mask=mask)
    for i in range(B):
        name = NAMES[[3, 1, 2, 2][i]] if i < 4 else None
        torch.testing.assert_close(out[i, PADS[i]:], ref[name, i][0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    """bf16 base, fp32 adapters: each row as AdapterView's bf16 batch gives it, to a few bf16
    ulps of the logits (the row's update is summed over other row groups than in the full-batch
    matmul, then rounded to bf16), and far from the other adapters' rows."""
    model = build(torch.bfloat16)
    ids, valid, mask, pos = batch()
    routing = ROUTINGS[1]
    view = MultiAdapterView(model, NAMES, backend=backend)
    view.route(routing)
    with torch.no_grad():
        got = view(ids, pos, mask=mask).float()
        want = {n: AdapterView(model, n)(ids, pos, mask=mask).float() for n in NAMES}
    assert got.dtype == torch.float32 and not got.isnan().any()
    scale = max(w.abs().max().item() for w in want.values())
    for i, k in enumerate(routing):
        pad = PADS[i]
        err = (got[i, pad:] - want[NAMES[k]][i, pad:]).abs().max().item()
        assert err <= 0.03 * scale, (i, err, scale)
        for other in NAMES:
            if other != NAMES[k]:
                assert (got[i, pad:] - want[other][i, pad:]).abs().max().item() > 5 * err


def test_training_state_is_untouched_and_the_view_is_a_snapshot(fp32):
    model, (ids, valid, mask, pos, next_ids), ref = fp32
    x = ids[:2, :5]
    set_adapter(model, "refiner")
    active = {p: m.active for p, m in lora_modules(model).items()}
    with torch.no_grad():
        before = model(x)
    view = MultiAdapterView(model, NAMES)
    view.route([2, 0])
    with torch.no_grad():
        routed = view(x)
        view.route([0, 2, 1])  # more rows routed than the forward has: refused
        with pytest.raises(ValueError, match="routed"):
            view(x)
        assert {p: m.active for p, m in lora_modules(model).items()} == active
        assert torch.equal(model(x), before)
        # the view holds copies: further training does not reach it until it is rebuilt
        a = model.layers[0].self_attn.q_proj.lora_A["verifier"]
        saved = a.clone()
        a.mul_(3)
        view.route([2, 0])
        assert torch.equal(view(x), routed)
        assert (_fresh(model, [2, 0])(x) - routed).abs().max() > 1e-3
        a.copy_(saved)
    with pytest.raises(ValueError):
        view.route([4])
    with pytest.raises(ValueError):
        view.index("critic")
    with pytest.raises(ValueError):
        MultiAdapterView(model, ["generator", "generator"])


def _fresh(model, routing):
    view = MultiAdapterView(model, NAMES)
    view.route(routing)
    return view
