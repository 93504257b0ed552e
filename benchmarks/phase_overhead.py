"""What marking the phases costs a run that is not profiled (docs/pipeline.md, "Profiling").

    .venv/bin/python benchmarks/phase_overhead.py runs/default

Times `with phase(...) as p: p.count(...)` (malt_fast/phases.py) outside any profiler, against
the same loop without it, then multiplies by the number of phase calls the run made (its
prefill batches, decode steps and optimizer steps, read from its metrics files) and prints that
beside the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from malt_fast.phases import phase


def per_call_s(n: int = 200_000, repeats: int = 5) -> float:
    """Seconds per marked call, the bare loop's time taken out (best of `repeats`)."""
    def marked():
        t = time.perf_counter()
        for _ in range(n):
            with phase("decode") as p:
                p.count(1, "forward")
        return time.perf_counter() - t

    def bare():
        t = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t

    return (min(marked() for _ in range(repeats)) - min(bare() for _ in range(repeats))) / n


def phase_calls(run_dir: Path) -> tuple[int, float]:
    """(phase calls, wall seconds of the stages) of a finished run."""
    calls, wall = 0, 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        calls += rec.get("decode_steps", 0) + rec.get("prefill_calls", 0)
        wall += rec.get("wall_s", 0.0) if rec.get("stage") != "evaluate" else 0.0
        wall += rec.get("evaluate_wall_s", 0.0) if rec.get("method") == "MA" else 0.0
    for path in run_dir.glob("train/**/metrics.jsonl"):
        calls += sum(1 for _ in path.read_text().splitlines())  # one per optimizer step
    return calls, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    run_dir = ap.parse_args().run_dir
    each = per_call_s()
    calls, wall = phase_calls(run_dir)
    print(f"one marked phase call: {each * 1e6:.2f} µs (not profiling)")
    print(f"{run_dir}: {calls} phase calls -> {calls * each * 1e3:.1f} ms of "
          f"{wall:.0f} s of stages ({100 * calls * each / max(wall, 1e-9):.4f}%)")


if __name__ == "__main__":
    main()
