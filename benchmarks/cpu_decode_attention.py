"""CPU paged decode attention on a G→V→R tree step: per-row (flat) vs shared-block (cascade).

One decode step of a tree expansion, built by hand as the paged cache lays it out: a fork shares
its parent's full blocks (same block ids at the same table positions) and copies the partial last
block into a block of its own. Default step (SmolLM2-135M attention shape: Hq 9, Hkv 3, D 64,
block size 16), 96 rows:

- 3 questions at the refinement level: a 200-token prompt shared by 27 rows, 3 generations
  (128 tokens, 9 rows each), 9 critiques (128 tokens, 3 rows each), then 48–80 tokens per row;
- 5 questions at an earlier level: a 200-token prompt shared by 3 rows, 40–120 tokens per row.

In one process, with --threads intra-op threads, the calls of each method interleaved:

- baseline: the per-row kernel as it was at git revision --baseline (default 6ec9cdb, the commit
  before the shared-block kernel), compiled from `git show REV:csrc/decode_attention.cpp` into
  its own op namespace (cached under build/);
- flat: `torch.ops.malt_fast.paged_decode_attention(..., shared=False)`: today's micro-kernels,
  every row reading its whole context on its own;
- shared: the default, each block shared by several rows read once for all of them;

per call, median and min over --reps repetitions; each repetition calls every one of --layers
pools once (a decode step calls the op once per layer on that layer's pool, so by the next step
the KV bytes come from DRAM; --layers 1 reuses one pool, mostly cached). Every method is checked
against the torch reference (fp64).

    python benchmarks/cpu_decode_attention.py --threads 2 --dtype float32 bfloat16 \
        --out benchmarks/results/cpu_decode_attention.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

# benchmark the checkout this file is in (its malt_fast/_C*.so: setup.py build_ext --inplace),
# not whichever malt_fast is installed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tree_step(refine_questions=3, early_questions=5, prompt=200, turn=128, n=3, bs=16, seed=0):
    """Block tables and context lengths of one step; returns (tables [B, width] int32,
    lens [B] int32, number of blocks used). Block ids are a random permutation of the pool."""
    rng = np.random.default_rng(seed)
    rows = []  # per row: list of block keys; a key is (node, index) so shared blocks coincide

    def extend(parent_keys, parent_len, node, n_new):
        """A fork of a sequence of parent_len tokens (parent_keys cover them) extended by n_new:
        the parent's full blocks are shared, the rest (partial block copy + new tokens) owned."""
        full = parent_len // bs
        length = parent_len + n_new
        keys = list(parent_keys[:full]) + [(node, i) for i in range(full, -(-length // bs))]
        return keys, length

    node = 0
    for q in range(refine_questions + early_questions):
        node += 1
        pk, plen = extend([], 0, node, prompt)
        if q < refine_questions:  # prompt -> n generations -> n critiques each -> n refinements
            for _ in range(n):
                node += 1
                gk, glen = extend(pk, plen, node, turn)
                for _ in range(n):
                    node += 1
                    ck, clen = extend(gk, glen, node, turn)
                    for _ in range(n):
                        node += 1
                        rows.append(extend(ck, clen, node, int(rng.integers(48, 81))))
        else:
            for _ in range(n):
                node += 1
                rows.append(extend(pk, plen, node, int(rng.integers(40, 121))))
    keys = sorted({k for r, _ in rows for k in r})
    ids = dict(zip(keys, rng.permutation(len(keys)).tolist()))
    width = max(len(r) for r, _ in rows)
    tables = np.zeros((len(rows), width), np.int32)
    for i, (r, _) in enumerate(rows):
        tables[i, : len(r)] = [ids[k] for k in r]
    lens = np.array([length for _, length in rows], np.int32)
    return tables, lens, len(keys)


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


PREAMBLE = """\
`torch.ops.malt_fast.paged_decode_attention` on one decode step of a G→V→R tree, written by
`benchmarks/cpu_decode_attention.py` (see its docstring for the step). Methods: **baseline**, the
per-row kernel of the `--baseline` git revision (every (row, kv head) reads its whole context);
**flat**, this kernel with `shared=False` (the same per-row order, today's micro-kernels);
**shared**, the default (a block held by several rows read once for all of them). Pools: 8 =
each repetition calls the op once on each of 8 layers' pools, as a step does (KV from DRAM);
1 = the same pool every call (mostly in L3). ms per call, median and min over the repetitions,
the methods' calls interleaved; errors against the fp64 torch reference.

"""


def load_baseline(rev):
    """The kernel source at git revision `rev`, built as torch.ops.malt_fast_baseline.*"""
    from torch.utils import cpp_extension

    root = ROOT
    src = subprocess.run(["git", "show", f"{rev}:csrc/decode_attention.cpp"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    src = src.replace("(malt_fast,", "(malt_fast_baseline,")
    build = os.path.join(root, "build", f"bench_baseline_{rev}")
    os.makedirs(build, exist_ok=True)
    path = os.path.join(build, "decode_attention_baseline.cpp")
    if not os.path.exists(path) or open(path).read() != src:
        with open(path, "w") as f:
            f.write(src)
    cpp_extension.load(name=f"malt_fast_baseline_{rev}", sources=[path], build_directory=build,
                       extra_cflags=["-O3", "-fopenmp", "-march=native", "-std=c++17"],
                       extra_ldflags=["-fopenmp"], is_python_module=False)
    return torch.ops.malt_fast_baseline.paged_decode_attention


def run(dtype, layers, reps, baseline_op, Hq=9, Hkv=3, D=64, bs=16):
    import malt_fast._C  # noqa: F401  (registers torch.ops.malt_fast.*)
    from malt_fast.rollout.paged_cache import reference_decode_attention

    tables, lens, nblocks = tree_step(bs=bs)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(layers, nblocks, bs, Hkv, D, generator=g).to(dtype)
    v = torch.randn(layers, nblocks, bs, Hkv, D, generator=g).to(dtype)
    q = torch.randn(len(lens), Hq, D, generator=g).to(dtype)
    tables, lens = torch.from_numpy(tables), torch.from_numpy(lens)
    scale = D ** -0.5
    op = torch.ops.malt_fast.paged_decode_attention
    methods = {}
    if baseline_op is not None:
        methods["baseline"] = lambda i: baseline_op(q, k[i], v[i], tables, lens, scale)
    methods["flat"] = lambda i: op(q, k[i], v[i], tables, lens, scale, False)
    methods["shared"] = lambda i: op(q, k[i], v[i], tables, lens, scale, True)

    ref = reference_decode_attention(q.double(), k[0].double(), v[0].double(), tables, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    errors = {}
    for name, f in methods.items():
        err = (f(0).double() - ref).abs().max().item()
        errors[name] = err
        assert err <= tol * (1 + ref.abs().max().item()), (name, err)
    times = {name: [] for name in methods}
    for rep in range(reps + 1):  # the first round warms up
        for name, f in methods.items():
            t = time.perf_counter()
            for i in range(layers):
                f(i)
            if rep:
                times[name].append((time.perf_counter() - t) / layers)
    rows = int(lens.shape[0])
    return {name: dict(median=1e3 * statistics.median(ts), min=1e3 * min(ts), err=errors[name])
            for name, ts in times.items()}, rows, int(lens.sum()), nblocks


def main():
    import malt_fast

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 1])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--baseline", default="6ec9cdb", help="git revision, or 'none'")
    p.add_argument("--out", help="write the results (markdown) here")
    args = p.parse_args()
    baseline_op = None if args.baseline == "none" else load_baseline(args.baseline)
    load0 = os.getloadavg()
    lines = ["| threads | dtype | pools | method | median ms/call | min ms/call | vs baseline "
             "| vs flat | max abs err vs fp64 |", "|---|---|---|---|---|---|---|---|---|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dt in args.dtype:
            for layers in args.layers:
                res, rows, tokens, nblocks = run(getattr(torch, dt), layers, args.reps,
                                                 baseline_op)
                for name, r in res.items():
                    base = res.get("baseline", {}).get("median")
                    vs_base = f"{base / r['median']:.2f}×" if base else "–"
                    vs_flat = f"{res['flat']['median'] / r['median']:.2f}×"
                    line = (f"| {threads} | {dt} | {layers} | {name} | {r['median']:.3f} | "
                            f"{r['min']:.3f} | {vs_base} | {vs_flat} | {r['err']:.1e} |")
                    lines.append(line)
                    print(line, flush=True)
    load1 = os.getloadavg()
    header = [
        f"Device: {cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"load average {load0[0]:.2f} at the start, "
        f"{load1[0]:.2f} at the end; malt_fast from {os.path.dirname(malt_fast.__file__)}.",
        f"Step: {rows} rows, {tokens} tokens attended in all, {nblocks} distinct blocks "
        "(Hq 9, Hkv 3, D 64, block size 16).",
        "",
        "Command: `python " + " ".join(sys.argv) + "`",
        "",
    ]
    print("\n".join(header))
    if args.out:
        with open(args.out, "w") as f:
            f.write("# CPU paged decode attention: per-row vs shared-block\n\n")
            f.write(PREAMBLE)
            f.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
