"""DPO loss over the lm_head: forward + backward time and peak extra memory, one process.

    python benchmarks/dpo_loss.py                          # CPU: 4 pairs x 256 tokens, bf16
    python benchmarks/dpo_loss.py --dtype bfloat16 float32
    pip install --no-deps --target /tmp/liger liger-kernel==0.8.5
    PYTHONPATH=/tmp/liger python benchmarks/dpo_loss.py    # adds Liger's chunked DPO loss

Every method maps hidden states [2B, T, H] (the B chosen sequences, then the B rejected ones) and
the lm_head [V, H] to the sigmoid DPO loss on per-sequence log-prob sums, then backward into
both, the way a DPO step ends:

- eager: logits [2BT, V], fp32 log_softmax, gather, sums;
- compiled: `torch.compile` of eager, 1024 tokens at a time;
- ours: `malt_fast.kernels.linear_logprobs` (the trainer's head), sums;
- liger: Liger-Kernel's `LigerFusedLinearDPOLoss` (chunked, `torch.compile`d by Liger; on a
  CPU it needs no Triton), when importable. It takes no precomputed reference, so it runs with
  `use_ref_model=False` (reference log-probs 0) and every method gets that reference: the same
  loss. Its `chunk_size` is 1 sequence pair, its default.

The first `--prompt` tokens of each sequence are prompt (target ignored), as in a DPO batch;
`--prompt 0` makes every token count (N = 2BT log-probs, the head-level benchmark's setting).
Each method's loss is checked against an fp64 eager reference. Memory and timing as in
`benchmarks/logprob.py` (peak RSS with mmap'd allocations; medians, rotating order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logprob import Peak, cpu_gemms, cpu_memory_setup, cpu_name  # noqa: E402

IGNORE = -100


def dpo_from_sums(sums: torch.Tensor, beta: float) -> torch.Tensor:
    chosen, rejected = sums.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def eager(h, w, y, beta):
    two_b, t, hd = h.shape
    flat_y = y.reshape(-1)
    logp = torch.log_softmax((h.reshape(-1, hd) @ w.t()).float(), -1)
    tok = logp.gather(1, flat_y.clamp(min=0)[:, None])[:, 0] * (flat_y != IGNORE)
    return dpo_from_sums(tok.view(two_b, t).sum(1), beta)


def make_compiled(chunk):
    def chunked(h, w, y, beta):
        two_b, t, hd = h.shape
        flat_h, flat_y = h.reshape(-1, hd), y.reshape(-1)
        outs = []
        for i in range(0, flat_h.shape[0], chunk):
            z = (flat_h[i:i + chunk] @ w.t()).float()
            yc = flat_y[i:i + chunk]
            outs.append(torch.log_softmax(z, -1).gather(1, yc.clamp(min=0)[:, None])[:, 0]
                        * (yc != IGNORE))
        return dpo_from_sums(torch.cat(outs).view(two_b, t).sum(1), beta)

    return torch.compile(chunked, dynamic=False)


def ours(h, w, y, beta):
    from malt_fast.kernels import linear_logprobs

    two_b, t, hd = h.shape
    tok = linear_logprobs(h.reshape(-1, hd), w, y.reshape(-1), ignore_index=IGNORE)
    return dpo_from_sums(tok.view(two_b, t).sum(1), beta)


def make_liger(beta):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    loss = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=beta, use_ref_model=False)

    def run(h, w, y, beta_):
        # Liger marks its inputs' sizes dynamic for torch.compile; fresh tensor objects keep that
        # mark off the ones the compiled baseline sees
        out = loss(w.view_as(w), h.view_as(h), y.clone())
        return out[0] if isinstance(out, tuple) else out

    return run


def bench(methods, pairs, T, prompt, H, V, dtype, beta, repeats):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2 * pairs, T, H, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * H ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (2 * pairs, T), generator=gen)
    y[:, :prompt] = IGNORE
    ref = eager(h.detach().double(), w.detach().double(), y, beta).item()
    times, mem, loss_err, failed = {m: [] for m in methods}, {}, {}, {}
    for m, fn in methods.items():  # warm-up (and compile), loss check, memory
        h.grad = w.grad = None
        try:
            loss = fn(h, w, y, beta)
            loss.backward()
        except Exception as e:
            failed[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            continue
        loss_err[m] = abs(loss.item() - ref)
        h.grad = w.grad = None
        with Peak("cpu") as p:
            fn(h, w, y, beta).backward()
        mem[m] = p.extra
    names = [m for m in methods if m not in failed]
    for r in range(repeats):
        for m in names[r % len(names):] + names[:r % len(names)]:
            h.grad = w.grad = None
            t0 = time.perf_counter()
            methods[m](h, w, y, beta).backward()
            times[m].append(time.perf_counter() - t0)
    rows = [dict(method=m, dtype=str(dtype).removeprefix("torch."), pairs=pairs, T=T,
                 prompt=prompt, H=H, V=V, best_s=min(times[m]),
                 median_s=statistics.median(times[m]), peak_extra_mib=mem[m] / 2**20,
                 loss_abs_err_vs_fp64=loss_err[m]) for m in names]
    return rows + [dict(method=m, error=err) for m, err in failed.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--T", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens per sequence (ignored)")
    ap.add_argument("--H", type=int, default=576)
    ap.add_argument("--V", type=int, default=49152)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=["eager", "compiled", "ours", "liger"])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    cpu_memory_setup()
    available = {"eager": eager, "compiled": make_compiled(1024), "ours": ours}
    liger = make_liger(args.beta)
    if liger is not None:
        available["liger"] = liger
    methods = {m: available[m] for m in args.methods if m in available}
    skipped = [m for m in args.methods if m not in available]
    print(f"device: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"ours: {cpu_gemms()}" + (f"; not available: {', '.join(skipped)}" if skipped else ""))
    all_rows = []
    for name in args.dtype:
        rows = bench(methods, args.pairs, args.T, args.prompt, args.H, args.V,
                     getattr(torch, name), args.beta, args.repeats)
        all_rows += rows
        n = 2 * args.pairs * (args.T - args.prompt)
        print(f"\n{2 * args.pairs} sequences x {args.T} tokens ({args.prompt} prompt), {n} "
              f"log-probs, H={args.H} V={args.V} {name}; DPO loss fwd+bwd, medians of "
              f"{args.repeats}")
        ok = [r for r in rows if "error" not in r]
        base = {k: next((r[k] for r in ok if r["method"] == "eager"), None)
                for k in ("median_s", "peak_extra_mib")}
        mine = next((r["median_s"] for r in ok if r["method"] == "ours"), None)
        print(f"{'method':<10}{'best s':>9}{'median s':>10}{'peak MiB':>10}{'time/eager':>11}"
              f"{'mem/eager':>10}{'ours/this':>10}{'|loss err|':>11}")
        for r in ok:
            te = r["median_s"] / base["median_s"] if base["median_s"] else float("nan")
            me = r["peak_extra_mib"] / base["peak_extra_mib"] if base["peak_extra_mib"] else float("nan")
            ot = mine / r["median_s"] if mine else float("nan")
            print(f"{r['method']:<10}{r['best_s']:>9.3f}{r['median_s']:>10.3f}"
                  f"{r['peak_extra_mib']:>10.1f}{te:>11.2f}{me:>10.3f}{ot:>10.2f}"
                  f"{r['loss_abs_err_vs_fp64']:>11.1e}")
        for r in rows:
            if "error" in r:
                print(f"{r['method']:<10} failed: {r['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
