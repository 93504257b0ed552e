"""Plain batched greedy decoding over the contiguous KVCache: prefill, then one token per step.

The rollout engine (malt_fast.rollout) is the fast path with paged, prefix-shared caches; this
one is small enough to read at a glance and serves as the demo and a cross-check.
"""

from __future__ import annotations

import torch

from malt_fast.model.llama import KVCache, Llama


@torch.inference_mode()
def greedy_generate(model: Llama, prompts: list[list[int]], max_new_tokens: int,
                    eos_token_ids: list[int], pad_token_id: int = 0) -> list[list[int]]:
    """Greedy completions (without the prompt, up to and excluding the first EOS) per prompt."""
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding keeps every row's last token at column T-1
        ids[i, T - len(p):] = torch.tensor(p, device=device)
        valid[i, T - len(p):] = True
    cache = KVCache(model.config, B, T + max_new_tokens, dtype, device)
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_token_ids or [-1], device=device)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        cache.append_valid(valid)
        h = model.hidden_states(ids, positions, cache)
        nxt = model.lm_head(h[:, -1]).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        ids, positions = nxt[:, None], positions[:, -1:] + 1
        valid = torch.ones(B, 1, dtype=torch.bool, device=device)
    completions = []
    for row in out.tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_token_ids), len(row))
        completions.append(row[:cut])
    return completions
