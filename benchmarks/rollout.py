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

import torch

LAYOUT = dict(
    system="You are a careful math tutor.",
    question="Solve the problem step by step and end with 'The answer is N'.\n{question}",
    verifier="Check the solution above step by step. Point out any mistake.",
    refiner="Using the critique, write a corrected solution ending with 'The answer is N'.",
)
FALLBACK = ["A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep are left?",
            "A train travels 60 km per hour for 3 hours. How far does it go?"]


def load_questions(k: int) -> list[str]:
    from malt_fast.data.assets import DATA_PACKAGES, packaged_file
    from malt_fast.errors import MaltError

    try:
        dist, rel = DATA_PACKAGES["gsm8k"]
        with open(packaged_file(dist, rel.format(split="test"))) as f:
            qs = [json.loads(line)["question"] for _, line in zip(range(k), f)]
    except (MaltError, OSError, KeyError):
        qs = []
    return (qs + FALLBACK * k)[:k]


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
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
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


def run_engine(model, tok, questions, args, reuse, per_token) -> dict:
    from malt_fast.rollout import Engine, LevelSampling, RoleLayout, expand_tree

    eng = Engine(model, tok, max_batch=args.max_batch, cache_tokens=args.cache_tokens,
                 prefix_reuse=reuse, progress=not args.json)
    sampling = LevelSampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    _, st = expand_tree(eng, questions, RoleLayout(**LAYOUT), n=args.n, sampling=sampling,
                        seed=args.seed)
    return dict(prefill_tokens=st["prefill_tokens"], generated_tokens=st["generated_tokens"],
                peak_kv_bytes=st["peak_cache_blocks"] * eng.cache.block_size * per_token,
                wall_s=st["wall_s"], decode_steps=st["decode_steps"])


def warm_up(model, tok):
    """First matmuls of each shape build oneDNN kernels; keep that out of every timing."""
    from malt_fast.rollout import Engine

    Engine(model, tok, progress=False).generate([tok.encode("Hello there")] * 4, n=2,
                                                max_new_tokens=4, temperature=0.3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="our engine's weights; auto = bf16 only where the CPU has native bf16")
    p.add_argument("--max-batch", type=int, default=96)
    p.add_argument("--cache-tokens", type=int, default=65536)
    p.add_argument("--hf-dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--hf-batch", type=int, default=8, help="prompts per transformers call")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of a,b,c to leave out")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from malt_fast.data.assets import smollm2_gguf
    from malt_fast.model.checkpoint import load_model
    from malt_fast.model.tokenizer import load_tokenizer

    from malt_fast.model.dtypes import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    path = smollm2_gguf()
    tok = load_tokenizer(path)
    model = load_model(path, dtype, "cpu")
    per_token = kv_bytes_per_token(model.config, dtype)
    questions = load_questions(args.questions)
    skip = set(args.skip.split(","))
    results = {}
    load_start = os.getloadavg()[0]
    with torch.inference_mode():
        warm_up(model, tok)
        if "c" not in skip:
            results["c_engine_reuse"] = run_engine(model, tok, questions, args, True, per_token)
        if "b" not in skip:
            results["b_engine_no_reuse"] = run_engine(model, tok, questions, args, False,
                                                      per_token)
        if "a" not in skip:
            from transformers import AutoModelForCausalLM

            # transformers keeps GGUF weights packed and computes in fp32: its fastest setting
            hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      dtype=getattr(torch, args.hf_dtype)).eval()
            torch.manual_seed(args.seed)
            results["a_transformers"] = run_transformers(hf, tok, questions, args, per_token)
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
        device=f"CPU {platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads (no GPU)",
        versions=dict(python=sys.version.split()[0], torch=torch.__version__,
                      transformers=_version("transformers")),
        loadavg_1m=dict(start=load_start, end=os.getloadavg()[0]),
        results=results, ratios=ratios)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"device: {report['device']}; {report['versions']}; engine dtype "
          f"{report['engine_dtype']}; load avg {report['loadavg_1m']}")
    print(f"{'method':22s} {'tok/s':>8s} {'generated':>10s} {'prefill':>9s} "
          f"{'peak KV MiB':>12s} {'wall s':>8s}")
    for name, r in results.items():
        print(f"{name:22s} {r['tokens_per_s']:8.1f} {r['generated_tokens']:10d} "
              f"{r['prefill_tokens']:9d} {r['peak_kv_bytes'] / 2**20:12.1f} {r['wall_s']:8.1f}")
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
