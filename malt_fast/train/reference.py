"""Reference log-probs for DPO: the policy's own log-prob function, run once with the role's SFT
weights over the micro-batches of the DPO phase's first epoch, and cached next to the dataset,
so DPO training keeps no reference model in memory.

    ref = reference_logprobs(batch_logprobs, pairs, batches, "runs/x/dpo_verifier.jsonl",
                             model_key, layout="packing=tree|...")

Why the policy's batches and not any convenient ones: in bf16 and fp16 a GEMM's rounding depends
on the batch it runs in (padding, packing, which rows share a call), so the same sequence scored
in two layouts differs by up to tenths of a nat. A reference computed in another layout than the
policy's would make the first DPO step start off ln 2, and DPO would then fit that per-sequence
offset instead of the preference. Computed by the same function on the same micro-batches, the
reference is the policy's first forward bit for bit: loss ln 2, every reward 0. Later epochs
shuffle pairs into other batches; there the reference is off by layout rounding only (not
biased one way), and recomputing it per epoch would cost a forward per epoch.

`batch_logprobs(idx) -> (rows, logps)`: the pairs of micro-batch `idx` that this process scores
(`rows`, a list of pair indices; all of `idx` in one process, a rank's share under DeepSpeed)
and their log-probs [len(rows) * 2], chosen and rejected interleaved.

The cache file is `<dataset dir or cache_dir>/<dataset name>.reflogp-<key>.pt`. The key hashes
the dataset file's bytes, the model (`model_key`: e.g. `model_hash`, the role's own weights, or
every rank's shard of them), the tokenized pairs, the micro-batches and the `layout` (packing,
backend, device): any change picks another file, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from malt_fast.errors import MaltError, fail

CACHE_VERSION = 2  # bump when the log-prob computation changes meaning (2: the policy's batches)


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_hash(named_tensors, h=None) -> "hashlib._Hash":
    """sha256 over each (name, tensor)'s name, dtype, shape and bytes."""
    h = h or hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over every state_dict entry (weights and adapters)."""
    return tensors_hash(sorted(model.state_dict().items())).hexdigest()


def check_batches(batches: list[list[int]], n_pairs: int) -> None:
    """The micro-batches must score every pair exactly once."""
    if n_pairs == 0:
        raise ValueError("reference_logprobs: no pairs")
    seen = sorted(i for idx in batches for i in idx)
    if seen != list(range(n_pairs)):
        raise ValueError(f"reference_logprobs: the micro-batches must hold each of the {n_pairs} "
                         "pairs exactly once")


def reference_key(dataset_path, model_key: str, pairs, batches, layout: str) -> str:
    h = hashlib.sha256()
    for part in (f"v{CACHE_VERSION}", file_hash(dataset_path), model_key, repr(pairs),
                 repr(batches), layout):
        h.update(hashlib.sha256(part.encode()).digest())
    return h.hexdigest()


def cache_path(dataset_path, key: str, cache_dir=None) -> Path:
    dataset_path = Path(dataset_path)
    folder = Path(cache_dir) if cache_dir is not None else dataset_path.parent
    return folder / f"{dataset_path.name}.reflogp-{key[:20]}.pt"


def load_reference(path: Path, key: str, n_pairs: int) -> torch.Tensor | None:
    """The cached [n_pairs, 2] log-probs, or None when missing, torn or for another key."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: recompute rather than trust it
        return None
    logps = blob.get("logps") if isinstance(blob, dict) and blob.get("key") == key else None
    if isinstance(logps, torch.Tensor) and logps.shape == (n_pairs, 2):
        return logps
    return None


def save_reference(path: Path, key: str, logps: torch.Tensor) -> None:
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


@torch.no_grad()
def compute_reference(batch_logprobs, batches, n_pairs: int) -> torch.Tensor:
    """[n_pairs, 2] fp32 log-probs (chosen, rejected); rows no call returned stay 0."""
    out = torch.zeros(n_pairs, 2, dtype=torch.float32)
    for idx in batches:
        rows, logps = batch_logprobs(idx)
        if len(rows):
            out[torch.as_tensor(rows, dtype=torch.long)] = logps.detach().float().cpu().view(-1, 2)
    return out


def reference_logprobs(batch_logprobs, pairs, batches, dataset_path, model_key: str,
                       layout: str, cache_dir=None, all_reduce=None, write=True) -> torch.Tensor:
    """[len(pairs), 2] log-probs from the cache when dataset, model, pairs, batches and layout
    are unchanged, else computed with `batch_logprobs` over `batches` and cached. The caller
    puts the model in eval mode (no dropout), as the reference has none.

    Across ranks each process scores its share and `all_reduce` sums a tensor over them: all
    compute unless every one found the cache (the forwards are collective), the shares are
    summed into the whole table, and the process with `write` caches it."""
    dataset_path = Path(dataset_path)
    if not dataset_path.is_file():
        raise fail(dataset_path, "dataset file not found (reference log-probs are keyed by it)")
    check_batches(batches, len(pairs))
    key = reference_key(dataset_path, model_key, pairs, batches, layout)
    path = cache_path(dataset_path, key, cache_dir)
    logps = load_reference(path, key, len(pairs))
    summed = all_reduce or (lambda t: t)
    if summed(torch.tensor([float(logps is None)])).item():
        logps = summed(compute_reference(batch_logprobs, batches, len(pairs)))
        if write:
            save_reference(path, key, logps)
    return logps
