"""DPO training step: tokens/s and peak memory, unpacked vs tree-packed, eager vs fused head.

    python benchmarks/train_step.py                          # SmolLM2-135M, verifier-shaped batch
    python benchmarks/train_step.py --model random-small     # a small random Llama (faster)
    python benchmarks/train_step.py --role refiner --prompts 2 --repeats 3 --json out.json
    python benchmarks/train_step.py --model llama-3.2-1b --finetune full --prompts 8   # GPU, MFU
    python benchmarks/train_step.py --model llama-3.1-8b --checkpointing --prompts 4   # GPU, LoRA

One process, one model, one batch, four methods: {unpacked, tree} x {eager, fused}.
  unpacked: every (prompt, completion) sequence is its own right-padded row, as in TRL;
  tree:     one row per prompt: the prompt once, then each distinct completion, under an
            ancestor mask (malt_fast.train.packing; what `packing: tree` trains with);
  eager:    lm_head logits [N, V] + fp32 log-softmax + gather (losses.eager_logprobs);
  fused:    malt_fast.kernels.linear_logprobs (never materialises the logits).

A step = policy forward + backward + AdamW step on LoRA adapters (rank 16, all projections; or on
every weight with --finetune full) of a DPO loss whose reference log-probs are precomputed (as the
trainer caches them). --model llama-3.2-1b / llama-3.1-8b / smollm2-135m-random: random weights
of that shape (benchmarks/decode_step.py's SHAPES). --checkpointing recomputes each decoder block
in the backward (malt_fast.train.distributed.checkpoint_blocks, what the DeepSpeed path uses).

MFU (CUDA): model FLOPs of the tokens a method actually computes (padded rows for unpacked, packed
rows for tree) per second, over --peak-tflops (default from the device name: H100/H200 989 dense
bf16). Per token: 2 x (matmul parameters) forward, twice that backward for the activation
gradients, once more for the weight gradients with --finetune full (frozen weights have none),
plus attention 4 x layers x hidden x context (x3 with its backward); the head counts as a matmul
of hidden x vocab. Recomputation (--checkpointing, the fused head's backward) is not counted, as
MFU's convention is.

Batch (MALT-shaped, synthetic token ids): `--prompts` parents, each with `--children` sibling
completions labelled positive/negative (at least one of each), DPO pairs = positive x negative
siblings (3 children -> 2 pairs). Lengths: question 100-300 tokens, each turn 100-400 tokens, plus
chat-template overhead. generator: prompt = question; verifier: question + generator turn;
refiner: question + generator turn + critique.

tokens/s counts the *unpacked* tokens of the batch (sum over pairs of len(chosen sequence) +
len(rejected sequence), prompt included, no padding) for every method, so the ratio of two
methods' tokens/s is the speedup of one over the other on the same work.

Peak memory: CUDA: allocator peak during the step minus memory held before. CPU: peak RSS
(VmHWM, reset through /proc/self/clear_refs) minus RSS before, with glibc set to return big frees
to the OS. Memory is measured on each method's first (warm-up) step, which also creates the AdamW
state (small: LoRA only). Times: best and median of --repeats after the warm-up; methods rotate
order each repeat so a noisy neighbour hits all of them alike. CPU time (process_time, all
threads) is reported beside wall time: with other jobs on the cores it is the steadier of the two
(use --threads 1 there: two-thread GEMMs stall whenever one thread is descheduled). The spread
of the four methods' losses is printed (equal up to rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_step import SHAPES, random_model  # noqa: E402
from logprob import Peak, cpu_memory_setup, sync  # noqa: E402

from malt_fast.model.lora import LoRAConfig, add_adapter, adapter_parameters  # noqa: E402
from malt_fast.train.losses import dpo_loss, eager_logprobs  # noqa: E402
from malt_fast.train.packing import pack_sequences  # noqa: E402
from malt_fast.train.trainer import policy_logprobs  # noqa: E402

TEMPLATE = 12  # tokens a chat template adds per turn (role markers, newlines)


def load(name, dtype, device):
    from malt_fast.model.llama import Llama, LlamaConfig

    if name == "smollm2":
        from malt_fast.data import smollm2_gguf
        from malt_fast.model import load_model

        return load_model(smollm2_gguf(), dtype=dtype).to(device)
    if name in SHAPES:
        torch.manual_seed(0)
        return random_model(name, dtype, device)
    if name == "random-small":  # SmolLM2's vocabulary, a quarter of its depth and width
        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768,
                                  num_hidden_layers=6, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" not in n:
                    p.normal_(0, 0.02)
        return model.to(device, dtype)
    raise SystemExit(f"--model: unknown model {name!r}")


def step_flops(model, row_lengths, full: bool) -> float:
    """Model FLOPs of one training step over rows of these lengths (module docstring)."""
    c = model.config
    per_layer = sum(m.weight.numel() for n, m in model.layers[0].named_modules()
                    if isinstance(m, torch.nn.Linear) and "lora" not in n)
    matmul = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    passes = 3 if full else 2  # forward, activation grads, (weight grads)
    flops = 0.0
    for n in row_lengths:
        flops += passes * 2 * matmul * n
        # causal attention: QK^T and PV over ~n/2 keys on average, forward + backward
        flops += 3 * 4 * c.num_hidden_layers * c.hidden_size * n * n / 2
    return flops


def peak_tflops(device_name: str) -> float | None:
    name = device_name.upper()
    for key, tf in (("H200", 989.4), ("H100", 989.4), ("A100", 312.0)):
        if key in name:
            return tf
    return None


def malt_batch(rng, vocab, role, prompts, children):
    """[(prompt_ids, chosen_ids, rejected_ids)] for `prompts` parents, pos x neg siblings."""
    def toks(lo, hi):
        return [rng.randrange(100, vocab - 100) for _ in range(rng.randint(lo, hi) + TEMPLATE)]

    pairs = []
    for _ in range(prompts):
        prompt = toks(100, 300)  # the question (the system turn is folded into the template)
        for _ in range({"generator": 0, "verifier": 1, "refiner": 2}[role]):
            prompt += toks(100, 400)  # earlier roles' turns
        kids = [toks(100, 400) for _ in range(children)]
        n_pos = rng.randint(1, children - 1)
        pairs += [(prompt, c, r) for c in kids[:n_pos] for r in kids[n_pos:]]
    return pairs


def make_step(model, pairs, packing, head, ref, full, beta=0.2):
    params = [p for p in model.parameters() if p.requires_grad] if full else \
        adapter_parameters(model, "policy")
    opt = torch.optim.AdamW(params, lr=1e-5)
    seqs = [s for p, c, r in pairs for s in ((p, c), (p, r))]
    logprob_fn = eager_logprobs if head == "eager" else None

    def step():
        opt.zero_grad(set_to_none=True)
        seq, _ = policy_logprobs(model, seqs, packing, logprob_fn=logprob_fn)
        seq = seq.view(-1, 2)
        loss, _ = dpo_loss(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], beta)
        loss.backward()
        opt.step()
        return loss.item()

    state = [p.detach().clone() for p in params]

    def restore():  # every method starts from, and leaves, the same adapter
        with torch.no_grad():
            for p, s in zip(params, state):
                p.copy_(s)

    return step, restore


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2",
                    choices=["smollm2", "random-small", *sorted(SHAPES)])
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--checkpointing", action="store_true", help="recompute decoder blocks")
    ap.add_argument("--peak-tflops", type=float, help="device bf16 peak for MFU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--role", default="verifier", choices=["generator", "verifier", "refiner"])
    ap.add_argument("--prompts", type=int, default=1, help="parents (prompts) in the batch")
    ap.add_argument("--children", type=int, default=3, help="sibling completions per prompt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="*",
                    default=["unpacked/eager", "unpacked/fused", "tree/eager", "tree/fused"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); "
                    "1 keeps timings stable when other jobs share the cores")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.children < 2:
        raise SystemExit("--children: need at least 2 (one positive, one negative)")
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    if dev == "cpu":
        cpu_memory_setup()
    model = load(args.model, dtype, dev)
    full = args.finetune == "full"
    if full:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        add_adapter(model, "policy", LoRAConfig(rank=16, alpha=32.0))
    if args.checkpointing:
        from malt_fast.train.distributed import checkpoint_blocks

        checkpoint_blocks(model)
    model.train()
    pairs = malt_batch(random.Random(args.seed), model.config.vocab_size, args.role,
                       args.prompts, args.children)
    seqs = [s for p, c, r in pairs for s in ((p, c), (p, r))]
    packed = pack_sequences(seqs)
    unpacked_tokens = packed.unpacked_tokens
    padded = len(seqs) * max(len(p) + len(c) for p, c in seqs)
    with torch.no_grad():  # a reference a little off the policy, so the loss has a gradient
        ref, _ = policy_logprobs(model, seqs, "none")
        ref = (ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
               .to(ref)).view(-1, 2)

    device_name = torch.cuda.get_device_name() if dev == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device: {device_name}; torch {torch.__version__}; python {platform.python_version()}; "
          f"load average {load_avg}")
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{str(dtype).removeprefix('torch.')}), role {args.role}: {args.prompts} prompt(s) x "
          f"{args.children} children -> {len(pairs)} pairs")
    print(f"tokens per step: unpacked {unpacked_tokens} (padded rows {padded}), tree-packed "
          f"{packed.packed_tokens} in {packed.input_ids.shape[0]} row(s) of "
          f"{packed.input_ids.shape[1]} -> {unpacked_tokens / packed.packed_tokens:.2f}x fewer")

    steps, losses, mem = {}, {}, {}
    for m in args.methods:
        packing, head = m.split("/")
        steps[m] = make_step(model, pairs, "tree" if packing == "tree" else "none", head, ref,
                             full)
    for m, (step, restore) in steps.items():  # warm-up: memory, and the loss each method gives
        restore()
        with Peak(dev) as p:
            losses[m] = step()
        mem[m] = p.extra
    times, cpu = {m: [] for m in steps}, {m: [] for m in steps}
    names = list(steps)
    for r in range(args.repeats):
        for m in names[r % len(names):] + names[:r % len(names)]:
            step, restore = steps[m]
            restore()
            sync(dev)
            t, c = time.perf_counter(), time.process_time()
            step()
            sync(dev)
            times[m].append(time.perf_counter() - t)
            cpu[m].append(time.process_time() - c)

    width = max(len(p) + len(c) for p, c in seqs)
    row_lengths = {"unpacked": [width] * len(seqs),
                   "tree": [packed.input_ids.shape[1]] * packed.input_ids.shape[0]}
    peak = args.peak_tflops or (peak_tflops(device_name) if dev == "cuda" else None)
    rows = []
    for m in names:
        best, med = min(times[m]), statistics.median(times[m])
        flops = step_flops(model, row_lengths[m.split("/")[0]], full)
        rows.append(dict(method=m, best_s=best, median_s=med, tokens_per_s=unpacked_tokens / best,
                         tokens_per_s_median=unpacked_tokens / med,
                         peak_extra_mib=mem[m] / 2**20, loss=losses[m], times_s=times[m],
                         cpu_s=cpu[m], tokens_per_cpu_s=unpacked_tokens / min(cpu[m]),
                         model_tflops=flops / 1e12, achieved_tflops=flops / best / 1e12,
                         mfu=flops / best / (peak * 1e12) if peak else None))
    base = rows[0]
    print(f"\n{'method':16s} {'best s':>8s} {'median s':>9s} {'tokens/s':>9s} {'peak MiB':>9s} "
          f"{'speed/' + base['method']:>24s} {'mem/' + base['method']:>22s} {'cpu s':>7s}")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["mem_ratio"] = r["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)
        print(f"{r['method']:16s} {r['best_s']:8.2f} {r['median_s']:9.2f} {r['tokens_per_s']:9.0f} "
              f"{r['peak_extra_mib']:9.0f} {r['speedup']:24.2f} {r['mem_ratio']:22.2f} "
              f"{min(r['cpu_s']):7.2f}  {r['achieved_tflops']:7.2f} TFLOP/s"
              + (f" MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "") + "   times "
              + " ".join(f"{t:.1f}" for t in r["times_s"]))
    by = {r["method"]: r for r in rows}

    def ratio(a, b, key):
        return by[a][key] / max(by[b][key], 1e-9)

    comparisons = [(f"tree/{h}", f"unpacked/{h}", f"tree / unpacked ({h} head)")
                   for h in ("eager", "fused")]
    comparisons += [(f"{p}/fused", f"{p}/eager", f"fused / eager ({p})")
                    for p in ("unpacked", "tree")]
    for a, b, label in comparisons:
        if a in by and b in by:
            print(f"{label}: {ratio(a, b, 'tokens_per_s'):.2f}x tokens/s "
                  f"(best), {ratio(a, b, 'tokens_per_s_median'):.2f}x (median), "
                  f"{ratio(a, b, 'peak_extra_mib'):.2f}x peak memory")
    spread = max(losses.values()) - min(losses.values())
    print(f"losses of the {len(losses)} methods agree to {spread:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "argv": sys.argv,
                       "threads": torch.get_num_threads(), "finetune": args.finetune,
                       "checkpointing": args.checkpointing, "peak_tflops": peak,
                       "load_average": load_avg, "pairs": len(pairs),
                       "unpacked_tokens": unpacked_tokens, "packed_tokens": packed.packed_tokens,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
