"""G→V→R tree expansion three ways, in one process, on the same model and questions:

(a) transformers `generate` level by level with num_return_sequences=n, each level's prompts
    rendered with the chat template and re-encoded (what a user writes today);
(b) our engine with prefix reuse off (every branch prefills its whole context);
(c) our engine with prefix reuse on (contexts extend their parent's cached sequence).

    python benchmarks/rollout.py --questions 4 --n 3 --max-new-tokens 48 [--json]

Prefill tokens: tokens pushed through the model before decoding (for (a) including the left
padding of each batch, which transformers computes too). Peak KV memory: bytes of keys/values
held at once (for (a), the padded cache of the largest generate call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

LAYOUT = dict(
    system="You are a careful math tutor.",
    question="Solve the problem step by step and end with 'The answer is N'.\n{question}",
    verifier="Check the solution above step by step. Point out any mistake.",
    refiner="Using the critique, write a corrected solution ending with 'The answer is N'.",
)
FALLBACK = ["A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep are left?",
            "A train travels 60 km per hour for 3 hours. How far does it go?"]


def load_questions(k: int, path: str | None = None) -> list[str]:
    """The first k GSM8K test questions (from `path`, a JSONL with "question", if given)."""
    from malt_fast.data.assets import DATA_PACKAGES, packaged_file
    from malt_fast.errors import MaltError

    try:
        if path is None:
            dist, rel = DATA_PACKAGES["gsm8k"]
            path = packaged_file(dist, rel.format(split="test"))
        with open(path) as f:
            qs = [json.loads(line)["question"] for _, line in zip(range(k), f)]
    except (MaltError, OSError, KeyError):
        qs = []
    return (qs + FALLBACK * k)[:k]


def load(args, dtype, device):
    """Our model and tokenizer: the packaged GGUF, a model path, or random weights in the shape
    of a directory's config.json (--random-weights; decode speed does not depend on values)."""
    from malt_fast.data.assets import smollm2_gguf
    from malt_fast.model.checkpoint import load_model, read_hf_config
    from malt_fast.model.llama import Llama
    from malt_fast.model.tokenizer import load_tokenizer

    path = args.model or smollm2_gguf()
    tok = load_tokenizer(path)
    if not args.random_weights:
        return load_model(path, dtype, device), tok
    torch.manual_seed(args.seed)
    model = Llama(read_hf_config(Path(path)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model.to(device=device, dtype=dtype).eval(), tok


def transformers_copy(model, dtype):
    """transformers' LlamaForCausalLM with our model's weights (saved and reloaded)."""
    import tempfile

    from transformers import LlamaForCausalLM

    from malt_fast.model.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        save_model(model, d, dtype)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype)
    return hf.to(next(model.parameters()).device).eval()


def kv_bytes_per_token(cfg, dtype) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


# ---------------------------------------------------------------- (a) transformers


def run_transformers(hf, tok, questions, args, per_token) -> dict:
    from malt_fast.rollout.tree import RoleLayout

    layout = RoleLayout(**LAYOUT)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_ids[0]
    stats = dict(prefill_tokens=0, generated_tokens=0, peak_kv_bytes=0)
    eos = set(tok.eos_token_ids)

    def base(q):
        return [{"role": "system", "content": layout.system},
                {"role": "user", "content": layout.render("question", q)}]

    def generate(transcripts):
        """One level: n samples per transcript, prompts batched with left padding."""
        outs = []
        for i in range(0, len(transcripts), args.hf_batch):
            chunk = [tok.apply_chat_template(m) for m in transcripts[i:i + args.hf_batch]]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=hf.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk],
                                device=hf.device)
            out = hf.generate(ids, attention_mask=mask, do_sample=True,
                              temperature=args.temperature, top_p=1.0, top_k=0,
                              num_return_sequences=args.n, max_new_tokens=args.max_new_tokens,
                              eos_token_id=tok.eos_token_ids, pad_token_id=pad)
            rows = ids.shape[0] * args.n
            stats["prefill_tokens"] += rows * width
            stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], rows * out.shape[1] * per_token)
            for row in out[:, width:].tolist():
                cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
                stats["generated_tokens"] += cut
                outs.append(row[:cut])
        return [outs[j * args.n:(j + 1) * args.n] for j in range(len(transcripts))]

    t0 = time.perf_counter()
    level = [base(q) for q in questions]
    for role in ("verifier", "refiner", None):
        replies = generate(level)
        if role is None:
            break
        level = [m + [{"role": "assistant", "content": tok.decode(r)},
                      {"role": "user", "content": getattr(layout, role)}]
                 for m, rs in zip(level, replies) for r in rs]
    stats["wall_s"] = time.perf_counter() - t0
    return stats


# ---------------------------------------------------------------- (b), (c) our engine


def run_engine(model, tok, questions, args, reuse, per_token, graphs=True) -> dict:
    from malt_fast.rollout import Engine, LevelSampling, RoleLayout, expand_tree

    eng = Engine(model, tok, max_batch=args.max_batch, cache_tokens=args.cache_tokens,
                 prefix_reuse=reuse, progress=not args.json, cuda_graphs=graphs)
    sampling = LevelSampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    _, st = expand_tree(eng, questions, RoleLayout(**LAYOUT), n=args.n, sampling=sampling,
                        seed=args.seed)
    return dict(prefill_tokens=st["prefill_tokens"], generated_tokens=st["generated_tokens"],
                peak_kv_bytes=st["peak_cache_blocks"] * eng.cache.block_size * per_token,
                wall_s=st["wall_s"], decode_steps=st["decode_steps"],
                prefill_calls=st["prefill_calls"], prefill_s=st["prefill_s"])


def warm_up(model, tok):
    """First matmuls of each shape build oneDNN/cuBLAS kernels (and Triton compiles): keep that
    out of every timing."""
    from malt_fast.rollout import Engine

    Engine(model, tok, progress=False).generate([tok.encode("Hello there")] * 4, n=2,
                                                max_new_tokens=4, temperature=0.3)


def measured(device, fn, *a, **kw) -> dict:
    """fn's stats plus the peak device memory it allocated (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = fn(*a, **kw)
    if device.type == "cuda":
        out["peak_device_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="our engine's weights; auto = bf16 on CUDA and on CPUs with native bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: the "
                   "packaged SmolLM2-135M-Instruct)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights in the shape of --model's config.json")
    p.add_argument("--questions-file", default=None, help="JSONL with a question field")
    p.add_argument("--max-batch", type=int, default=96)
    p.add_argument("--cache-tokens", type=int, default=65536)
    p.add_argument("--hf-dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--hf-batch", type=int, default=8, help="prompts per transformers call")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of a,b,c to leave out")
    p.add_argument("--graphs-ablation", action="store_true",
                   help="also run (c) with CUDA graphs off")
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from malt_fast.model.dtypes import resolve_dtype

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "auto" and device.type == "cuda" \
        else resolve_dtype(args.dtype)
    model, tok = load(args, dtype, device)
    per_token = kv_bytes_per_token(model.config, dtype)
    questions = load_questions(args.questions, args.questions_file)
    skip = set(args.skip.split(","))
    results = {}
    load_start = os.getloadavg()[0]
    with torch.inference_mode():
        warm_up(model, tok)
        if "c" not in skip:
            results["c_engine_reuse"] = measured(device, run_engine, model, tok, questions, args,
                                                 True, per_token)
        if args.graphs_ablation:
            results["c_engine_reuse_no_graphs"] = measured(
                device, run_engine, model, tok, questions, args, True, per_token, graphs=False)
        if "b" not in skip:
            results["b_engine_no_reuse"] = measured(device, run_engine, model, tok, questions,
                                                    args, False, per_token)
        if "a" not in skip:
            hf = transformers_copy(model, getattr(torch, args.hf_dtype))
            torch.manual_seed(args.seed)
            results["a_transformers"] = measured(device, run_transformers, hf, tok, questions,
                                                 args, per_token)
    for r in results.values():
        r["tokens_per_s"] = r["generated_tokens"] / r["wall_s"]
    ratios = {}
    a, b, c = (results.get(k) for k in ("a_transformers", "b_engine_no_reuse", "c_engine_reuse"))
    if a and c:
        ratios["c_over_a_tokens_per_s"] = c["tokens_per_s"] / a["tokens_per_s"]
        ratios["a_over_c_wall"] = a["wall_s"] / c["wall_s"]
    if b and c:
        ratios["c_over_b_tokens_per_s"] = c["tokens_per_s"] / b["tokens_per_s"]
        ratios["c_prefill_fraction_of_b"] = c["prefill_tokens"] / b["prefill_tokens"]
    report = dict(
        config=vars(args), engine_dtype=str(dtype).replace("torch.", ""),
        questions=len(questions),
        device=(torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"CPU {platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads (no GPU)"),
        weights="random" if args.random_weights else str(args.model or "packaged SmolLM2"),
        versions=dict(python=sys.version.split()[0], torch=torch.__version__,
                      transformers=_version("transformers"), triton=_version("triton")),
        loadavg_1m=dict(start=load_start, end=os.getloadavg()[0]),
        results=results, ratios=ratios)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"device: {report['device']}; {report['versions']}; engine dtype "
          f"{report['engine_dtype']}; load avg {report['loadavg_1m']}")
    print(f"{'method':26s} {'tok/s':>8s} {'generated':>10s} {'prefill':>9s} "
          f"{'peak KV MiB':>12s} {'wall s':>8s} {'peak dev MiB':>13s}")
    for name, r in results.items():
        dev_mem = f"{r['peak_device_mem_mib']:13.0f}" if "peak_device_mem_mib" in r else ""
        print(f"{name:26s} {r['tokens_per_s']:8.1f} {r['generated_tokens']:10d} "
              f"{r['prefill_tokens']:9d} {r['peak_kv_bytes'] / 2**20:12.1f} {r['wall_s']:8.1f}"
              f"{dev_mem}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    return 0


def _version(pkg: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:  # reported, never fatal
        return "?"


if __name__ == "__main__":
    sys.exit(main())
