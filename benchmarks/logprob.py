"""Fused linear log-prob: forward+backward time and peak extra memory vs baselines, one process.

    python benchmarks/logprob.py                      # CPU: N=2048, H=576, V=49152, bf16
    python benchmarks/logprob.py --dtype bfloat16 float32   # both dtypes, one table each
    MALT_FAST_ISA=avx512 python benchmarks/logprob.py # ours on fp32 GEMMs (no AVX512-BF16 ones)
    python benchmarks/logprob.py --device cuda        # GPU: N in {4096, 16384}, H=4096, V=128256
    python benchmarks/logprob.py --json out.json

Methods: (a) eager: logits, fp32 log_softmax, gather; (b) torch.compile of a token-chunked version;
(c) ours (malt_fast.kernels.linear_logprobs, default backend); (d) Liger-Kernel's fused linear
cross-entropy with reduction="none" (negated), when importable (on CPU it needs Triton's
interpreter, so it is skipped there unless it runs). Ratios are of medians.

Peak extra memory = peak during forward+backward minus what was allocated before (inputs); the
gradients themselves are included for every method. CUDA: the caching allocator's peak. CPU: peak
RSS (VmHWM, reset through /proc/self/clear_refs) with glibc set to mmap every allocation >= 128 KiB,
so freed tensors really leave the RSS. Times: best and median of --repeats after one warm-up; the
order of methods rotates each repeat so a noisy neighbour hits all of them alike.

On CPU the header says which GEMMs ours runs: "bf16 GEMMs" (AVX512-BF16 micro-kernel, bf16 inputs
only) or "fp32 GEMMs"; MALT_FAST_ISA=avx512 (or avx2, plain) forces the latter, for comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time

import torch


def cpu_memory_setup():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so big frees go back to the OS
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class Peak:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = _status("VmHWM") - self.base


def eager(h, w, y, g):
    logp = torch.log_softmax((h @ w.t()).float(), -1).gather(1, y[:, None])[:, 0]
    logp.backward(g)


def make_compiled(chunk):
    def chunked(h, w, y):
        outs = []
        for i in range(0, h.shape[0], chunk):
            z = (h[i:i + chunk] @ w.t()).float()
            outs.append(torch.log_softmax(z, -1).gather(1, y[i:i + chunk, None])[:, 0])
        return torch.cat(outs)

    fn = torch.compile(chunked, dynamic=False)

    def run(h, w, y, g):
        fn(h, w, y).backward(g)

    return run


def ours(h, w, y, g):
    from malt_fast.kernels import linear_logprobs

    linear_logprobs(h, w, y).backward(g)


def make_liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss)
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def run(h, w, y, g):
        (-loss(w, h, y)).backward(g)

    return run


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(methods, N, H, V, dtype, device, repeats):
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(N, H, generator=gen)).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * H ** -0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    g = torch.randn(N, generator=gen).to(device)
    times = {m: [] for m in methods}
    mem, failed = {}, {}
    for m, fn in methods.items():  # warm-up (and compile), and the memory measurement
        h.grad = w.grad = None
        try:
            fn(h, w, y, g)
        except Exception as e:  # e.g. Liger's Triton kernels on a CPU tensor
            failed[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            continue
        h.grad = w.grad = None
        with Peak(device) as p:
            fn(h, w, y, g)
        mem[m] = p.extra
    names = [m for m in methods if m not in failed]
    for r in range(repeats):
        for m in names[r % len(names):] + names[:r % len(names)]:
            h.grad = w.grad = None
            sync(device)
            t = time.perf_counter()
            methods[m](h, w, y, g)
            sync(device)
            times[m].append(time.perf_counter() - t)
    rows = []
    for m in names:
        rows.append(dict(method=m, N=N, H=H, V=V, dtype=str(dtype).removeprefix("torch."),
                         best_s=min(times[m]), median_s=statistics.median(times[m]),
                         peak_extra_mib=mem[m] / 2**20))
    rows += [dict(method=m, N=N, H=H, V=V, error=err) for m, err in failed.items()]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--N", type=int, nargs="*", help="token counts")
    ap.add_argument("--H", type=int)
    ap.add_argument("--V", type=int)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"],
                    choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024, help="token chunk of the compiled baseline")
    ap.add_argument("--methods", nargs="*", default=["eager", "compiled", "ours", "liger"])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cpu":
        cpu_memory_setup()
    Ns = args.N or ([4096, 16384] if dev == "cuda" else [2048])
    H = args.H or (4096 if dev == "cuda" else 576)
    V = args.V or (128256 if dev == "cuda" else 49152)
    available = {"eager": eager, "compiled": make_compiled(args.chunk), "ours": ours}
    liger = make_liger()
    if liger is not None:
        available["liger"] = liger
    methods = {m: available[m] for m in args.methods if m in available}
    skipped = [m for m in args.methods if m not in available]
    device_name = torch.cuda.get_device_name() if dev == "cuda" else \
        f"{cpu_name()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; python {platform.python_version()}")
    if dev == "cpu":
        print(f"ours on CPU: {cpu_gemms()}")
    if skipped:
        print(f"skipped (not importable): {', '.join(skipped)}")
    all_rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for N in Ns:
            rows = bench(methods, N, H, V, dtype, dev, args.repeats)
            print_table(rows, N, H, V, dtype_name)
            if dev == "cuda":
                base = {r["method"]: r for r in rows}
                floor = 4 * 2 * N * H * V / 790e12
                print(f"matmul floor (4 GEMMs at 790 TFLOP/s): {floor * 1e3:.2f} ms; ours = "
                      f"{base['ours']['median_s'] / floor:.2f}x floor")
            all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "argv": sys.argv,
                       "rows": all_rows}, f, indent=1)


def print_table(rows, N, H, V, dtype_name):
    base = {r["method"]: r for r in rows}
    print(f"\nN={N} H={H} V={V} {dtype_name} (median of the repeats; ratios of medians)")
    print(f"{'method':10s} {'best s':>9s} {'median s':>9s} {'peak MiB':>10s} "
          f"{'time/eager':>10s} {'mem/eager':>10s} {'ours/this':>10s}")
    ours_t = base["ours"]["median_s"] if "ours" in base else float("nan")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:10s} failed: {r['error']}")
            continue
        e = base.get("eager", r)
        r["time_vs_eager"] = r["median_s"] / e["median_s"]
        r["mem_vs_eager"] = r["peak_extra_mib"] / max(e["peak_extra_mib"], 1e-9)
        print(f"{r['method']:10s} {r['best_s']:9.3f} {r['median_s']:9.3f} "
              f"{r['peak_extra_mib']:10.1f} {r['time_vs_eager']:10.2f} "
              f"{r['mem_vs_eager']:10.3f} {ours_t / r['median_s']:10.2f}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_gemms():
    import os

    import malt_fast._C as C

    cap = os.environ.get("MALT_FAST_ISA")
    kind = "bf16 GEMMs for bf16 inputs (AVX512-BF16)" if C.cpu_bf16_gemm() else "fp32 GEMMs"
    return f"{kind}, row ops {C.cpu_isa()}" + (f" (MALT_FAST_ISA={cap})" if cap else "")


if __name__ == "__main__":
    main()
