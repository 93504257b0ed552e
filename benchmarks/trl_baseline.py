"""Our SFT and DPO phases against TRL's SFTTrainer and DPOTrainer (PEFT LoRA): the same model,
rows, batches in the same order, learning rate and schedule, beta, LoRA adapter to start from, and
the same reference (the starting adapter's log-probs). Per-step losses must agree, since the math
is the same; tokens/s and peak RSS are what differs.

TRL lives in its own virtualenv, so the project's dependencies stay as they are:

    python3.11 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 && \\
        .venv-trl/bin/pip install trl==1.16.0 peft==0.21.2 transformers==5.24.0 gguf protobuf
    .venv/bin/malt-fast run configs/default.yaml          # any run: its data/ is what is trained
    .venv/bin/python benchmarks/trl_baseline.py --data runs/default/data --role refiner \\
        --work /tmp/trl-bench --trl-python .venv-trl/bin/python --dtype float32 \\
        --out benchmarks/results/train_trl_fp32.json

The script runs in the project's venv, prepares what both sides read (an HF copy of the packaged
SmolLM2-135M-Instruct, the starting adapters in PEFT format, the rows in our batch order), runs our
phase in this process and TRL's in a second process (`--side trl`, with --trl-python), one after
the other, and prints the per-step losses side by side and the throughput ratios.

Same settings on both sides: one epoch, batch B rows (DPO: pairs), AdamW (torch) with weight decay
0, linear decay from the learning rate to 0, no warmup, no gradient clipping, LoRA dropout 0. DPO
starts from the adapter our SFT phase exported; SFT from a fresh adapter (A random, B = 0) exported
before training. tokens/s counts the unpacked tokens of the rows (prompt + completion, no padding)
per second of training steps, the same count on both sides; peak RSS is the process's maximum.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- our side (project venv)


def prepare_and_run_ours(args) -> dict:
    import torch

    from malt_fast.data import smollm2_gguf
    from malt_fast.model import load_model, load_tokenizer, save_model
    from malt_fast.model.lora import LoRAConfig, add_adapter, save_adapter, set_adapter
    from malt_fast.train.trainer import TrainConfig, Trainer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    tok = load_tokenizer(smollm2_gguf())
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():  # what TRL loads: an HF copy of the model
        tok.hf.chat_template = tok.chat_template
        tok.hf.save_pretrained(model_dir)
        save_model(load_model(smollm2_gguf()), model_dir)
    role, lora = args.role, {"rank": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0}
    common = dict(roles=(role,), batch_size=args.batch_size, sft_lr=args.sft_lr,
                  dpo_lr=args.dpo_lr, beta=args.beta, lora=lora, seed=0, save_every=10_000,
                  tensorboard=False, packing=args.packing, generator_dpo=True)

    # the fresh adapter both SFT runs start from
    start = work / "start"
    if not (start / role / "adapter_config.json").is_file():
        base = load_model(model_dir, dtype=dtype)
        torch.manual_seed(0)
        add_adapter(base, role, LoRAConfig(**lora))
        save_adapter(base, role, start / role)
    out = {"dtype": args.dtype, "role": role, "batch_size": args.batch_size,
           "packing": args.packing, "torch": torch.__version__}
    for phase in ("sft", "dpo"):
        run_dir = work / f"ours-{phase}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cfg = TrainConfig(**common, sft_epochs=1 if phase == "sft" else 0,
                          dpo_epochs=1 if phase == "dpo" else 0)
        model = load_model(model_dir, dtype=dtype)
        init = start if phase == "sft" else work / "ours-sft" / "checkpoints"
        trainer = Trainer(model, tok, args.data, run_dir, cfg, log=lambda *a: None,
                          init_from=init)
        # the rows in our batch order, for TRL to read in the same order
        data = trainer.phase_data(role, phase)
        order = [i for b in trainer.batch_order(data.groups, 1, role, phase) for i in b]
        rows = [json.loads(line) for line in open(data.path) if line.strip()]
        with open(work / f"{phase}_ordered.jsonl", "w") as f:
            for i in order:
                f.write(json.dumps(rows[i]) + "\n")
        t0 = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - t0
        steps = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        steps = [s for s in steps if s["phase"] == phase]
        step_s = sum(s["step_s"] for s in steps)
        out[phase] = {"losses": [s["loss"] for s in steps], "step_s": step_s,
                      "tokens": sum(s["tokens"] for s in steps),
                      "tokens_per_s": sum(s["tokens"] for s in steps) / step_s,
                      "wall_s": wall, "peak_rss_mib": peak_rss_mib(), "rows": len(order)}
        set_adapter(model, None)
    out["dpo_start"] = str(work / "ours-sft" / "checkpoints" / role)
    return out


# ---------------------------------------------------------------- TRL's side (TRL venv)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    work = Path(args.work)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(work / "model")
    ours = json.loads(Path(args.ours_json).read_text())
    out = {"trl_versions": {"trl": __import__("trl").__version__,
                            "transformers": __import__("transformers").__version__,
                            "peft": __import__("peft").__version__}}

    class Steps(TrainerCallback):
        """Wall time of the optimizer steps only (not the reference precompute)."""

        def __init__(self):
            self.t = None
            self.total = 0.0

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.total += time.perf_counter() - self.t

    def ordered(cls):
        class InOrder(cls):  # our batch order: no shuffling
            def _get_train_sampler(self, *a, **k):
                return SequentialSampler(self.train_dataset)
        return InOrder

    for phase in ("sft", "dpo"):
        rows = [json.loads(line) for line in open(work / f"{phase}_ordered.jsonl")]
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype)
        start = work / "start" / args.role if phase == "sft" else Path(ours["dpo_start"])
        model = PeftModel.from_pretrained(model, start, is_trainable=True)
        common = dict(output_dir=str(work / f"trl-{phase}"), per_device_train_batch_size=
                      args.batch_size, num_train_epochs=1, lr_scheduler_type="linear",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
                      logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                      bf16=args.dtype == "bfloat16", dataloader_num_workers=0)
        if phase == "sft":
            ds = Dataset.from_list([{"prompt": r["prompt"], "completion": [
                {"role": "assistant", "content": r["completion"]}]} for r in rows])
            cfg = SFTConfig(learning_rate=args.sft_lr, completion_only_loss=True, max_length=None,
                            **common)
            trainer = ordered(SFTTrainer)(model=model, args=cfg, train_dataset=ds,
                                          processing_class=tok)
        else:
            ds = Dataset.from_list([{"prompt": r["prompt"],
                                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                     "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                    for r in rows])
            cfg = DPOConfig(learning_rate=args.dpo_lr, beta=args.beta, loss_type=["sigmoid"],
                            precompute_ref_log_probs=True, max_length=None, **common)
            trainer = ordered(DPOTrainer)(model=model, args=cfg, train_dataset=ds,
                                          processing_class=tok)
        steps = Steps()
        trainer.add_callback(steps)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tokens = ours[phase]["tokens"]  # the same rows: the same unpacked token count
        out[phase] = {"losses": losses, "step_s": steps.total, "tokens": tokens,
                      "tokens_per_s": tokens / steps.total, "peak_rss_mib": peak_rss_mib()}
    return out


# ---------------------------------------------------------------- report


def report(ours: dict, trl: dict) -> str:
    lines = []
    for phase in ("sft", "dpo"):
        a, b = ours[phase], trl[phase]
        n = min(len(a["losses"]), len(b["losses"]))
        diff = max(abs(x - y) for x, y in zip(a["losses"][:n], b["losses"][:n]))
        lines += [f"{phase}: {len(a['losses'])} steps (TRL {len(b['losses'])}), max |loss "
                  f"difference| {diff:.2e}",
                  f"  tokens/s: ours {a['tokens_per_s']:.0f}, TRL {b['tokens_per_s']:.0f} "
                  f"({a['tokens_per_s'] / b['tokens_per_s']:.2f}x)",
                  f"  peak RSS MiB: ours {a['peak_rss_mib']:.0f}, TRL {b['peak_rss_mib']:.0f}",
                  "  step  ours     TRL"]
        lines += [f"  {i + 1:>4}  {x:.5f}  {y:.5f}" for i, (x, y) in
                  enumerate(zip(a["losses"][:n], b["losses"][:n]))]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", choices=["both", "trl"], default="both")
    ap.add_argument("--data", help="a run's data/ directory (sft_ and dpo_{role}.jsonl)")
    ap.add_argument("--role", default="refiner")
    ap.add_argument("--work", default="/tmp/trl-bench")
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sft-lr", type=float, default=2e-4)
    ap.add_argument("--dpo-lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.2)
    ap.add_argument("--packing", default="tree", choices=["tree", "none"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ours-json", help="(--side trl) our side's results")
    ap.add_argument("--out", help="write both sides' results here (JSON)")
    args = ap.parse_args(argv)
    if args.side == "trl":
        print(json.dumps(run_trl(args)))
        return 0
    ours = prepare_and_run_ours(args)
    ours_json = Path(args.work) / "ours.json"
    ours_json.write_text(json.dumps(ours))
    cmd = [args.trl_python, __file__, "--side", "trl", "--ours-json", str(ours_json)]
    for k in ("role", "work", "dtype", "batch_size", "rank", "sft_lr", "dpo_lr", "beta",
              "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    trl = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report(ours, trl))
    if args.out:
        Path(args.out).write_text(json.dumps({"ours": ours, "trl": trl}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
