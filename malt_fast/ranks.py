"""Expansion and evaluation across ranks: which process this is, and the process group.

Under `torchrun --nproc_per_node N -m malt_fast.cli expand|evaluate|run CONFIG` every rank reads
RANK, WORLD_SIZE and LOCAL_RANK from the environment, joins one process group (gloo on the CPU,
NCCL on CUDA, where rank r decodes on cuda:LOCAL_RANK), expands or evaluates its share of the
work, and rank 0 merges the shares and writes the stage records (docs/distributed.md, "Expansion
and evaluation across ranks"). Without a launcher (no WORLD_SIZE, or WORLD_SIZE=1) nothing here
does anything: rank 0 of a world of one, no group, no barrier.
"""

from __future__ import annotations

import datetime
import os

import torch

# Ranks wait at a barrier while another rank finishes a long share (an uneven last expansion
# chunk, an evaluation part, rank 0 training alone): longer than torch's 30-minute default.
TIMEOUT = datetime.timedelta(hours=int(os.environ.get("MALT_FAST_DIST_TIMEOUT_H", "12")))

_created = False


def world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Join the launcher's process group when WORLD_SIZE > 1 (gloo on the CPU, NCCL with CUDA,
    each rank on cuda:LOCAL_RANK). Returns True when this call created it (then `finish()`
    destroys it). One process without a launcher: nothing happens."""
    global _created
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    else:  # DeepSpeed, if a train stage runs in these processes, must not look for a GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _created = True
    return True


def finish() -> None:
    """Destroy the group `init()` created (a process that exits with a live group can abort
    at interpreter shutdown)."""
    global _created
    if _created and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _created = False


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def mine(index: int) -> bool:
    """Whether work item `index` (a chunk, an evaluation part) is this rank's: index % N == r."""
    return index % world() == rank()


def device(dev: torch.device) -> torch.device:
    """A config's device for this rank: plain "cuda" means cuda:LOCAL_RANK under a launcher."""
    if dev.type == "cuda" and dev.index is None and world() > 1:
        return torch.device("cuda", local_rank())
    return dev


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process."""
    if world() > 1 and torch.distributed.is_initialized():
        out = [None] * world()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]
