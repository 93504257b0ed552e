"""`malt-fast <stage>`: each stage is a function from files to files (docs/design.md)."""

from __future__ import annotations

import argparse
import os
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
    from malt_fast.malt.credit import Recipe, run_credit

    recipe = Recipe(args.recipe, args.verdict_weight, args.copy_share)
    summary = run_credit(args.trees, args.out, theta=args.theta, pairs=args.pairs,
                         max_pairs=args.max_pairs, seed=args.seed, prompts_path=args.prompts,
                         cut_replies=args.cut_replies, recipe=recipe)
    import json

    print(json.dumps(summary, indent=2))


def load_config(path, overrides: list[str]) -> dict:
    """A YAML config with `key.sub=value` overrides (values parsed as YAML), not yet checked."""
    from malt_fast.config import read_yaml

    return read_yaml(path, overrides)


def cmd_train(args) -> None:
    """Train the roles (SFT, then DPO; LoRA or full) on sft_{role}.jsonl / dpo_{role}.jsonl."""
    from malt_fast.train.trainer import Trainer, job_config, load_job_model

    cfg = load_config(args.config, args.set)
    job = job_config(cfg, args.config)
    if job.deepspeed is not None:
        # one DeepSpeed engine per role (docs/distributed.md)
        from malt_fast.train.distributed import train_from_config

        for role, path in train_from_config(cfg, args.config).items():
            print(f"{role}: {path}")
        return
    model, tok = load_job_model(job)
    trainer = Trainer(model, tok, job.data, job.out, job.train, init_from=job.init)
    for role, path in trainer.run().items():
        print(f"{role}: {path}")


def run_config(args, inputs: dict | None = None) -> dict:
    """The command's run config, checked against the schema, and the paths it names checked
    (malt_fast.pipeline.check_inputs, whose result goes into `inputs`): every mistake is found
    here, before any weights load."""
    from malt_fast.pipeline import check_inputs, resolve

    cfg = resolve(load_config(args.config, args.set), source=args.config)
    if getattr(args, "run_dir", None):
        cfg["run_dir"] = args.run_dir
    found = check_inputs(cfg, args.config)
    if inputs is not None:
        inputs.update(found)
    return cfg


def cmd_check(args) -> None:
    """Check a run config and the files it names (seconds; no weights load); print it resolved."""
    import yaml

    inputs: dict = {}
    cfg = run_config(args, inputs)
    shown = {**cfg, **{k: inputs[k] for k in ("model", "tokenizer", "prompts")}}
    print(f"# {args.config}: OK ({inputs['train_questions']} training and "
          f"{inputs['test_questions']} test questions; paths resolved; docs/config.md explains "
          "every field)")
    print(yaml.safe_dump(shown, sort_keys=False, default_flow_style=None, width=100), end="")


def cmd_run(args) -> None:
    """expand -> credit -> train -> evaluate in one run directory, resuming what is done."""
    from malt_fast.pipeline import Run, run_pipeline

    cfg = run_config(args)
    if args.restart:
        Run(cfg, log=stage_log()).restart(args.restart)
    if args.profile:  # the same run, timed per phase, with a trace (docs/pipeline.md)
        from malt_fast.profile import profile_pipeline

        profile_pipeline(cfg, trace=not args.no_trace, trace_calls=args.trace_calls or None)
    else:
        run_pipeline(cfg, log=stage_log())


def cmd_profile(args) -> None:
    """A short run (a few questions, one seed) timed per phase: profile.md and a trace."""
    from malt_fast.profile import fresh_run_dir, profile_pipeline, short_config

    cfg = short_config(run_config(args), args.questions, args.run_dir)
    fresh_run_dir(cfg["run_dir"])
    profile_pipeline(cfg, trace=not args.no_trace, trace_calls=args.trace_calls or None)


def cmd_expand(args) -> None:
    """Expand the configured training questions into RUN_DIR/trees.jsonl (resumable)."""
    from malt_fast.pipeline import Run
    from malt_fast.pipeline.expand import expand
    from malt_fast.pipeline.rounds import start_round

    run = Run(run_config(args), log=stage_log(), round=args.round or 1)
    if args.restart:
        run.restart("expand")
    start_round(run)  # round >= 2 expands with the previous round's adapters
    run.log(expand(run))


def cmd_evaluate(args) -> None:
    """SA, SA+MV@3, MA, MA+MV@3 (and MALT with the roles trained in RUN_DIR) over seeds."""
    from malt_fast.eval.evaluate import format_table
    from malt_fast.pipeline import Run
    from malt_fast.pipeline.evaluate import base_results, evaluate
    from malt_fast.pipeline.train import load_trained

    cfg = run_config(args)
    run = Run(cfg, log=stage_log(), round=args.round or cfg["rounds"])
    if args.restart:
        run.restart("evaluate")
    run.log(format_table(evaluate(run, trained=load_trained(run), base=base_results(run))))
    run.log(f"report: {run.dir / 'eval' / 'report.md'}")


# commands that run across ranks under torchrun (docs/distributed.md)
RANKED = ("run", "expand", "evaluate")


def stage_log():
    """print on rank 0 (and in one process); the other ranks of a torchrun launch stay quiet."""
    return print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)


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
    credit.add_argument("--cut-replies", choices=["drop", "keep"], default="drop",
                        help="replies cut by the token budget: left out of the training sets "
                             "(drop) or trained as open turns (keep)")
    credit.add_argument("--recipe", choices=["paper", "correction"], default="paper",
                        help="credit recipe (docs/malt.md)")
    credit.add_argument("--verdict-weight", type=float, default=1.0,
                        help="correction: the verdict's share of a critique's value")
    credit.add_argument("--copy-share", type=float, default=0.2,
                        help="correction: most refiner rows from right generations, as a share")
    credit.add_argument("--prompts", default=None, help="prompts YAML (default configs/prompts.yaml)")
    credit.set_defaults(func=cmd_credit)
    for name, func in [("run", cmd_run), ("expand", cmd_expand), ("evaluate", cmd_evaluate),
                       ("profile", cmd_profile), ("check", cmd_check)]:
        stage = sub.add_parser(name, help=func.__doc__)
        stage.add_argument("config", help="run config YAML (see configs/)")
        stage.add_argument("--run-dir", help="override the config's run_dir"
                           + (" (default: RUN_DIR-profile)" if name == "profile" else ""))
        stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set evaluate.questions=10")
        if name == "run":
            stage.add_argument("--profile", action="store_true",
                               help="time each phase; write RUN_DIR/profile/ (profile.md, trace)")
            stage.add_argument("--restart", choices=["expand", "credit", "train", "evaluate"],
                               help="delete this stage's outputs and the later stages', then run "
                                    "(after a settings change that makes them stale)")
        if name in ("expand", "evaluate"):
            stage.add_argument("--restart", action="store_true",
                               help=f"delete the {name} outputs (and the later stages') first")
        if name in ("run", "profile"):
            stage.add_argument("--no-trace", action="store_true",
                               help="with profiling: time the phases without torch.profiler")
            stage.add_argument("--trace-calls", type=int, default=3, metavar="N",
                               help="trace the ops of the first N calls of each phase "
                                    "(0: all; default 3)")
        if name == "profile":
            stage.add_argument("--questions", type=int, default=4,
                               help="training and test questions of the short run (default 4)")
        if name in ("expand", "evaluate"):
            stage.add_argument("--round", type=int, default=None,
                               help="iterative MALT round (default: expand 1, evaluate the last)")
        stage.set_defaults(func=func)

    train = sub.add_parser("train", help=cmd_train.__doc__)
    train.add_argument("config", help="YAML with model, data, out and a train: section "
                                      "(docs/train.md)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.sft_lr=1e-4")
    train.set_defaults(func=cmd_train)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ranked = args.command in RANKED
    try:
        if (args.command == "profile" or getattr(args, "profile", False)) and \
                int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MaltError("profiling runs in one process: start it without torchrun")
        if ranked:  # under torchrun: join the ranks' group (one process: nothing happens)
            from malt_fast import ranks

            ranks.init()
        args.func(args)
    except MaltError as e:
        print(f"malt-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("malt-fast: interrupted", file=sys.stderr)
        return 130
    finally:
        if ranked:
            ranks.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
