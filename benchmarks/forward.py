"""Prefill throughput: our Llama vs transformers' LlamaForCausalLM, same weights, same inputs.

    python benchmarks/forward.py                      # packaged SmolLM2-135M, CPU
    python benchmarks/forward.py --random-1b --device cuda --dtypes bf16   # 1B-shaped, GPU

Both models run the same full-sequence forward (logits for every position) under inference
mode; the median of --repeats timed runs after a warm-up is reported, with ours/theirs ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(fn, x, repeats, device):
    with torch.inference_mode():
        fn(x)
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def models(args, dtype):
    """(ours, transformers) on the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from malt_fast.data import smollm2_gguf
    from malt_fast.model import load_model

    if args.random_1b:
        import tempfile

        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          tie_word_embeddings=True, rope_theta=500000.0)
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).save_pretrained(d)
            theirs = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
            ours = load_model(d, dtype=dtype, device=args.device)
    else:
        path = smollm2_gguf()
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        ours = load_model(path, dtype=dtype, device=args.device)
    theirs.config._attn_implementation = "sdpa"
    return ours, theirs.to(args.device).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--shapes", default="1x512,8x256", help="BATCHxTOKENS,...")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--random-1b", action="store_true", help="1B-shaped random Llama instead")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    rows = []
    for dname in args.dtypes.split(","):
        ours, theirs = models(args, DTYPES[dname])
        vocab = ours.config.vocab_size
        for shape in args.shapes.split(","):
            B, T = map(int, shape.split("x"))
            x = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
            x = x.to(args.device)
            with torch.inference_mode():
                diff = (ours(x).float() - theirs(x).logits.float()).abs().max().item()
            t_ours = time_forward(ours, x, args.repeats, args.device)
            t_theirs = time_forward(lambda i: theirs(i).logits, x, args.repeats, args.device)
            rows.append(dict(dtype=dname, batch=B, tokens=T, ours_tok_s=B * T / t_ours,
                             transformers_tok_s=B * T / t_theirs, speedup=t_theirs / t_ours,
                             max_abs_logit_diff=diff))
        del ours, theirs
    meta = dict(device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=__import__("transformers").__version__,
                model="random 1B-shaped Llama" if args.random_1b else "SmolLM2-135M-Instruct GGUF")
    if args.json:
        print(json.dumps(dict(meta=meta, rows=rows), indent=2))
        return
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(f"{'dtype':>5} {'BxT':>8} {'ours tok/s':>11} {'HF tok/s':>10} {'ours/HF':>8} {'max|Δ|':>9}")
    for r in rows:
        print(f"{r['dtype']:>5} {r['batch']:>3}x{r['tokens']:<4} {r['ours_tok_s']:>11.0f} "
              f"{r['transformers_tok_s']:>10.0f} {r['speedup']:>7.2f}x {r['max_abs_logit_diff']:>9.2e}")


if __name__ == "__main__":
    main()
