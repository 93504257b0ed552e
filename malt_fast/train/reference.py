"""Reference log-probs for DPO: computed once with the (SFT) reference model, cached next to the
dataset, so DPO training keeps no reference model in memory.

    logps = reference_logprobs(model, sequences, "runs/x/dpo_verifier.jsonl")

`sequences` is a list of (input_ids, labels) pairs (lists or 1-D tensors; labels hold IGNORE on
prompt tokens, see losses.py); the result is an fp32 tensor [len(sequences)] of summed completion
log-probs, in order. For DPO pass chosen and rejected sequences of all pairs, e.g. interleaved.

The cache file is `<dataset dir or cache_dir>/<dataset name>.reflogp-<key>.pt`, where the key hashes
the dataset file's bytes, the model (every state_dict tensor: weights and adapters; or a
caller-supplied `model_key`, e.g. for a ZeRO-3-sharded model whose local state is partial) and the
token sequences. Any change picks a different file, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from malt_fast.errors import MaltError, fail
from malt_fast.train.losses import IGNORE, token_logprobs

CACHE_VERSION = 1  # bump when the log-prob computation changes meaning


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over each state_dict entry's name, dtype, shape and bytes (weights + adapters)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _as_list(x, what, i):
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"reference_logprobs: sequence {i}: {what} must be 1-D")
        return x.tolist()
    return list(x)


def _sequences(sequences):
    out = []
    for i, seq in enumerate(sequences):
        try:
            ids, labels = seq
        except (TypeError, ValueError):
            raise ValueError(f"reference_logprobs: sequence {i} is not an (input_ids, labels) "
                             "pair") from None
        ids, labels = _as_list(ids, "input_ids", i), _as_list(labels, "labels", i)
        if len(ids) != len(labels) or len(ids) < 2:
            raise ValueError(f"reference_logprobs: sequence {i}: {len(ids)} input_ids and "
                             f"{len(labels)} labels (need equal lengths >= 2)")
        out.append((ids, labels))
    if not out:
        raise ValueError("reference_logprobs: no sequences")
    return out


def _sequences_hash(seqs) -> str:
    h = hashlib.sha256()
    for ids, labels in seqs:
        h.update(repr((ids, labels)).encode())
    return h.hexdigest()


def cache_path(dataset_path, key: str, cache_dir=None) -> Path:
    dataset_path = Path(dataset_path)
    folder = Path(cache_dir) if cache_dir is not None else dataset_path.parent
    return folder / f"{dataset_path.name}.reflogp-{key[:20]}.pt"


@torch.no_grad()
def compute_logprobs(model, seqs, batch_size=8, backend=None) -> torch.Tensor:
    """Summed completion log-probs [len(seqs)] in fp32, batches right-padded (causal: padding after
    a sequence cannot change it). Longest-first batching keeps padding low."""
    device = model.lm_head.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = len(seqs[idx[0]][0])
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(seqs[i][0])
            ids[r, :n] = torch.tensor(seqs[i][0])
            labels[r, :n] = torch.tensor(seqs[i][1])
        logp = token_logprobs(model, ids.to(device), labels.to(device), backend=backend)
        out[idx] = logp.sum(-1).float().cpu()
    return out


def reference_logprobs(model, sequences, dataset_path, cache_dir=None, model_key=None,
                       batch_size=8, backend=None) -> torch.Tensor:
    """Summed completion log-probs [len(sequences)] under `model`, read from the cache when the
    dataset file, the model and the sequences are unchanged, else computed and cached.

    `model` is put in eval mode for the computation and restored afterwards.
    """
    dataset_path = Path(dataset_path)
    if not dataset_path.is_file():
        raise fail(dataset_path, "dataset file not found (reference log-probs are keyed by it)")
    seqs = _sequences(sequences)
    parts = [f"v{CACHE_VERSION}", file_hash(dataset_path), model_key or model_hash(model),
             _sequences_hash(seqs)]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()
    path = cache_path(dataset_path, key, cache_dir)
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: recompute rather than trust it
            blob = {"error": str(e)}
        logps = blob.get("logps") if isinstance(blob, dict) and blob.get("key") == key else None
        if isinstance(logps, torch.Tensor) and logps.shape == (len(seqs),):
            return logps
    was_training = model.training
    model.eval()
    try:
        logps = compute_logprobs(model, seqs, batch_size, backend)
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": key, "logps": logps}, f)
        os.replace(tmp, path)  # readers see the old file or the complete new one, never a torn one
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise MaltError(f"{path}: cannot write reference log-prob cache ({e.strerror})") from None
    return logps
