"""The expand stage: the configured training questions -> RUN_DIR/trees.jsonl, one G→V→R tree
per question (skips finished question ids; across ranks, every rank writes its chunks to its
own part and rank 0 merges them, docs/distributed.md)."""

from __future__ import annotations

import time
from pathlib import Path

from malt_fast import ranks
from malt_fast.errors import MaltError
from malt_fast.phases import span
from malt_fast.pipeline.rounds import previous_checkpoints
from malt_fast.pipeline.run_dir import Run


def expand(run: Run) -> Path:
    from malt_fast.malt.expand import (level_sampling, merge_rank_parts, parts_finished_ids,
                                       rank_part, rank_parts, run_expand)
    from malt_fast.malt.trees import finished_ids

    c = run.cfg
    run.guard("expand")
    train = run.examples("train")[: c["train_questions"]]
    if not train:
        raise MaltError(f"{c['dataset']}: the training split is empty")
    path = run.dir / "trees.jsonl"
    complete = {e.id for e in train} <= finished_ids(path, report=run.log)
    parts = ranks.world() > 1 or bool(rank_parts(path))
    ranks.barrier()  # every rank has decided before rank 0 writes anything
    if complete:
        if parts and ranks.is_main():  # a merge cut short after trees.jsonl was written
            merge_rank_parts(path, [e.id for e in train], run.log)
        run.log(f"expand: {path} complete, skipped")
        ranks.barrier()
        return path
    with span("expand"):
        # round 1 shares one engine across roles (shared-prefix rollout); later rounds have a
        # trained adapter per role, so each role decodes through its own weights
        engines = run.models.engine() if run.round == 1 else run.models.role_engines()
        t0 = time.perf_counter()
        args = (c["n"], level_sampling(c), c["prompts"], run.seed, c["chunk_questions"],
                run.metrics, run.log)
        if not parts:
            totals = run_expand(train, engines, path, *args)
        else:
            done = parts_finished_ids(path, run.log)
            ranks.barrier()  # every rank has read what is done before any rank writes
            totals = run_expand(train, engines, rank_part(path, ranks.rank()), *args,
                                shard=(ranks.rank(), ranks.world()), done=done)
            per_rank = ranks.gather(totals)
            if ranks.is_main():
                merge_rank_parts(path, [e.id for e in train], run.log)
                totals = _over_ranks(per_rank)
    run.record("expand", time.perf_counter() - t0, adapters=str(previous_checkpoints(run)),
               **totals)
    ranks.barrier()  # trees.jsonl is merged before any rank goes on
    return path


def _over_ranks(per_rank: list[dict]) -> dict:
    """Tokens summed over the ranks, wall time the slowest rank's."""
    totals = {k: sum(t[k] for t in per_rank)
              for k in ("questions", "generated_tokens", "prefill_tokens")}
    totals["wall_s"] = max(t["wall_s"] for t in per_rank)
    totals["tokens_per_s"] = totals["generated_tokens"] / max(totals["wall_s"], 1e-9)
    totals.update(world_size=ranks.world(), per_rank=per_rank)
    return totals
