"""`malt-fast <stage>`: each stage is a function from files to files (see DESIGN.md)."""

from __future__ import annotations

import argparse
import sys
import time

from malt_fast.errors import MaltError


def cmd_demo(args) -> None:
    """Load the packaged model and answer a few packaged GSM8K questions, greedily."""
    import re

    import torch

    from malt_fast.data import load_dataset, smollm2_gguf
    from malt_fast.data.text import normalize_number
    from malt_fast.model import load_model, load_tokenizer
    from malt_fast.model.generate import greedy_generate

    path = args.model or smollm2_gguf()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    t0 = time.perf_counter()
    model, tok = load_model(path), load_tokenizer(path)
    print(f"loaded {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) "
          f"in {time.perf_counter() - t0:.1f}s")
    examples = load_dataset("gsm8k", "test")[: args.questions]
    system = ("Solve the math word problem step by step. "
              "End with a line 'Final Answer: <number>'.")
    prompts = [tok.apply_chat_template([{"role": "system", "content": system},
                                        {"role": "user", "content": ex.question}])
               for ex in examples]
    t0 = time.perf_counter()
    outs = greedy_generate(model, prompts, args.max_new_tokens, tok.eos_token_ids, tok.pad_token_id)
    seconds = time.perf_counter() - t0
    correct = 0
    for ex, out in zip(examples, outs):
        text = tok.decode(out)
        numbers = re.findall(r"-?[\d,]*\.?\d+", text.split("Final Answer:")[-1])
        answer = normalize_number(numbers[-1]) if numbers else None
        correct += answer == ex.gold
        print(f"\n=== {ex.id}: {ex.question}\n--- model: {text.strip()}\n"
              f"--- answer {answer} / gold {ex.gold} {'✓' if answer == ex.gold else '✗'}")
    tokens = sum(len(o) for o in outs)
    print(f"\n{correct}/{len(examples)} correct; {tokens} tokens in {seconds:.1f}s "
          f"({tokens / seconds:.1f} tokens/s, batch {len(examples)}, greedy)")


def cmd_credit(args) -> None:
    """Rewards, values and labels on a trees.jsonl; SFT/DPO sets per role (no model needed)."""
    from malt_fast.malt.credit import run_credit

    summary = run_credit(args.trees, args.out, theta=args.theta, pairs=args.pairs,
                         max_pairs=args.max_pairs, seed=args.seed, prompts_path=args.prompts)
    import json

    print(json.dumps(summary, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="malt-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--model", help="HF directory or .gguf file (default: packaged SmolLM2)")
    demo.add_argument("--questions", type=int, default=4)
    demo.add_argument("--max-new-tokens", type=int, default=200)
    demo.add_argument("--threads", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    credit = sub.add_parser("credit", help=cmd_credit.__doc__)
    credit.add_argument("--trees", required=True)
    credit.add_argument("--out", required=True)
    credit.add_argument("--theta", type=float, default=0.5)
    credit.add_argument("--pairs", choices=["all", "max_k", "one"], default="all")
    credit.add_argument("--max-pairs", type=int, default=None)
    credit.add_argument("--seed", type=int, default=0)
    credit.add_argument("--prompts", default=None, help="prompts YAML (default configs/prompts.yaml)")
    credit.set_defaults(func=cmd_credit)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MaltError as e:
        print(f"malt-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("malt-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
