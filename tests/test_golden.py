"""The tiny config's outputs, byte for byte, against those recorded on this kind of CPU
(tests/golden/tiny_fp32.json): trees.jsonl, the SFT and DPO sets, the adapters and results.json.
A change that means to change no behaviour (a restructuring) keeps them; a change that means to
change outputs records them again:

    .venv/bin/python tests/test_golden.py --record

fp32 GEMMs round differently per CPU kind and torch build, so the file holds one record per
(vendor, ISA, torch) and a CPU without one skips the test, saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_fp32.json"
# the tiny config, smaller still: one minute on a 2-core CPU
OVERRIDES = {"dtype": "float32", "threads": 1, "train_questions": 3,
             "evaluate": {"seeds": [0], "questions": 2, "chains": 3, "star": False}}


def cpu_kind() -> str:
    import torch

    vendor = "unknown"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    isa = os.environ.get("MALT_FAST_ISA") or torch.backends.cpu.get_cpu_capability()
    return f"{vendor}/{platform.machine()}/{isa}/torch-{torch.__version__}"


def _without_times(node):
    if isinstance(node, dict):
        return {k: _without_times(v) for k, v in node.items()
                if not (k.endswith("_s") or k == "wall_s")}
    if isinstance(node, list):
        return [_without_times(v) for v in node]
    return node


def tiny_outputs(run_dir: Path) -> dict[str, str]:
    """Run the (shrunk) tiny config into run_dir; sha256 of each output that must not move."""
    from malt_fast.config import read_yaml
    from malt_fast.pipeline import resolve, run_pipeline

    cfg = read_yaml(ROOT / "configs" / "tiny.yaml")
    cfg.update({k: v for k, v in OVERRIDES.items() if k != "evaluate"})
    cfg["evaluate"] = {**cfg.get("evaluate", {}), **OVERRIDES["evaluate"]}
    cfg["run_dir"] = str(run_dir)
    run_pipeline(resolve(cfg, "configs/tiny.yaml"), log=lambda *a, **k: None)
    files = [run_dir / "trees.jsonl", *sorted((run_dir / "data").glob("*_*.jsonl")),
             *sorted((run_dir / "train" / "checkpoints").glob("*/adapter_model.safetensors"))]
    out = {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest()
           for f in files}
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    out["eval/results.json"] = hashlib.sha256(json.dumps(
        _without_times(results), sort_keys=True).encode()).hexdigest()
    return out


def recorded() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def test_tiny_outputs_are_unchanged(tmp_path):
    kind = cpu_kind()
    golden = recorded().get(kind)
    if golden is None:
        pytest.skip(f"no golden outputs recorded for this CPU ({kind}); "
                    "`python tests/test_golden.py --record` records them")
    got = tiny_outputs(tmp_path / "run")
    changed = sorted(k for k in golden.keys() | got.keys() if golden.get(k) != got.get(k))
    assert not changed, f"outputs differ from {GOLDEN.name} ({kind}): {changed}"


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        raise SystemExit(__doc__)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as d:
        hashes = tiny_outputs(Path(d) / "run")
    table = recorded()
    table[cpu_kind()] = hashes
    GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{GOLDEN}: {cpu_kind()}: {len(hashes)} files")
