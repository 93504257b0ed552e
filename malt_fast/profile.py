"""Where a run's time goes: `malt-fast profile CONFIG` (a short run) or `malt-fast run --profile`.

Per phase -- prefill, decode, credit, SFT step, DPO step, reference log-probs, evaluation -- the
profile reports wall time and its share of the run, tokens/s, model FLOPs utilization (on a GPU
whose peak is in GPU_PEAK_TFLOPS) and peak memory (CUDA: allocator peak within the phase; CPU:
the process's max RSS when the phase ended, a high-water mark). It writes
`profile/trace.json` (torch.profiler, opens in Perfetto or chrome://tracing, with a
`malt/<phase>` range around every phase), `profile/profile.md` and `profile/profile.json`.

The phases are marked where they happen (malt_fast/phases.py): the engine's prefill and decode
steps, the trainer's optimizer steps and DPO reference log-probs, model loading, and the
pipeline's credit and evaluate stages, each a `malt/<phase>` torch.profiler range. While
profiling, `collecting(profiler)` also times each range and counts its tokens; otherwise a
range is all it costs.

Times are exclusive: a phase inside another is taken
out of the outer one. Evaluation is the exception: its rollout (prefill and decode) stays in
"evaluation" (the trace still shows those ranges nested inside it), so prefill and decode mean
the expansion's rollout. Loading the model and tokenizer is a row of its own; what no phase
covers (imports, tokenizing, tree bookkeeping, writing files and plots) is "other", so the
shares add up to 100%.
"""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from malt_fast.errors import MaltError
from malt_fast.phases import collecting

# (key, label in the table); the trace range of each is "malt/<key>"
PHASES = (("load", "model + tokenizer loading"), ("prefill", "prefill"), ("decode", "decode"),
          ("credit", "credit"), ("sft", "SFT step"), ("dpo", "DPO step"),
          ("reference", "reference log-probs"), ("evaluate", "evaluation"))
TOKENS_MEAN = {
    "load": "no tokens",
    "prefill": "prompt tokens run (expansion)",
    "decode": "tokens generated (expansion)",
    "credit": "no tokens (scores trees, writes the sets)",
    "sft": "token positions run through the model (as the trainer counts them)",
    "dpo": "token positions run through the model, chosen and rejected",
    "reference": "tokens of the sequences scored",
    "evaluate": "prompt tokens run + tokens generated",
}
MARKER = ".malt-profile"  # marks a directory `malt-fast profile` made, so it may be replaced

# dense peak TFLOP/s (no sparsity) per data type, from the vendors' data sheets; the first
# matching name wins, so the more specific names come first
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("RTX 4090", {"bf16": 165.0, "tf32": 82.6, "fp32": 82.6}),
    ("V100", {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7}),  # fp16 tensor cores; no bf16
    ("T4", {"bf16": 65.0, "tf32": 8.1, "fp32": 8.1}),
)


def gpu_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was chosen) or (None, why unknown)."""
    if device.type != "cuda":
        return None, f"unknown for {device.type} (MFU is reported on GPUs with a known peak)"
    name = torch.cuda.get_device_name(device)
    if dtype in (torch.bfloat16, torch.float16):
        kind = "bf16"
    elif torch.backends.cuda.matmul.allow_tf32:
        kind = "tf32"
    else:
        kind = "fp32"
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in name:
            return peaks[kind] * 1e12, f"{name}: {peaks[kind]:g} TFLOP/s dense {kind}"
    return None, f"unknown for {name} (not in malt_fast.profile.GPU_PEAK_TFLOPS)"


def matmul_params(config) -> tuple[int, int]:
    """(weights multiplied per token in the decoder layers, in the LM head). FLOPs per token
    are 2x these for a forward pass; attention's score FLOPs are left out (short contexts)."""
    h, hd = config.hidden_size, config.head_dim
    per_layer = (h * config.num_attention_heads * hd * 2              # q, o
                 + h * config.num_key_value_heads * hd * 2            # k, v
                 + 3 * h * config.intermediate_size)                  # gate, up, down
    return config.num_hidden_layers * per_layer, h * config.vocab_size


@dataclass
class PhaseStat:
    wall_s: float = 0.0
    calls: int = 0          # prefill batches, decode steps, optimizer steps, ...
    tokens: int = 0
    flops: float = 0.0
    peak_bytes: int = 0


@dataclass
class _Frame:
    name: str
    absorb: bool
    t0: float
    child_s: float = 0.0
    peak: int = 0


class Profiler:
    def __init__(self, trace_calls: int | None = 3):
        # the device of the first model a wrapper sees (CPU until then); memory and MFU follow it
        self.device = torch.device("cpu")
        # the trace keeps every phase's range, but the ops inside only for the first
        # `trace_calls` calls of each phase (None: all): one decode step of a 30-layer model is
        # thousands of op events, and even a short run takes hundreds of steps
        self.trace_calls = trace_calls
        self.traced: dict[str, int] = {}
        self._ops = [True]
        self.cuda = False
        self.stats = {k: PhaseStat() for k, _ in PHASES}
        self.stack: list[_Frame] = []
        self.config = None  # the model's LlamaConfig, seen by the first wrapper that runs
        self.dtype = torch.float32
        self.t0 = self.wall_s = None

    # ------------------------------------------------------------ phases

    def _sync(self):
        if self.cuda:  # kernels are asynchronous: time what ran, not what was queued
            torch.cuda.synchronize(self.device)

    def _memory(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    @staticmethod
    def _record_ops(on: bool) -> None:
        # RecordFunction is what the profiler hooks: switched off, ops leave no events (a
        # private switch; without it every op is kept)
        switch = getattr(torch.autograd, "_enable_record_function", None)
        if switch is not None:
            switch(on)

    @contextlib.contextmanager
    def range(self, name: str, limited: bool = True):
        """A `malt/<name>` range in the trace, with the ops inside it for the first
        `trace_calls` calls of `name` only (limited=False: always)."""
        n = self.traced.get(name, 0)
        self.traced[name] = n + 1
        on = not limited or self.trace_calls is None or n < self.trace_calls
        self._record_ops(True)  # the range itself is always recorded
        try:
            with record_function(f"malt/{name}"):
                self._ops.append(on)
                self._record_ops(on)
                try:
                    yield
                finally:
                    self._ops.pop()
                    self._record_ops(True)
        finally:
            self._record_ops(self._ops[-1])

    @contextlib.contextmanager
    def phase(self, name: str, model=None, absorb: bool = False):
        """Time `name` (exclusive of nested phases) inside a `malt/<name>` trace range.
        absorb=True keeps nested phases' time and tokens in this one (evaluation). Yields
        what counts the phase's work (malt_fast.phases.phase)."""
        if model is not None:
            self.see_model(model)
        with self.range(name):
            if any(f.absorb for f in self.stack):
                yield self
                return
            self._sync()
            if self.cuda:  # the allocator has one peak counter: save the parent's, then reset
                if self.stack:
                    self.stack[-1].peak = max(self.stack[-1].peak, self._memory())
                torch.cuda.reset_peak_memory_stats(self.device)
            frame = _Frame(name, absorb, time.perf_counter())
            self.stack.append(frame)
            try:
                yield self
            finally:
                self._sync()
                self.stack.pop()
                dt = time.perf_counter() - frame.t0
                st = self.stats[name]
                st.wall_s += dt - frame.child_s
                frame.peak = max(frame.peak, self._memory())
                st.peak_bytes = max(st.peak_bytes, frame.peak)
                if self.stack:
                    self.stack[-1].child_s += dt
                    self.stack[-1].peak = max(self.stack[-1].peak, frame.peak)

    def count(self, tokens: int = 0, kind: str | None = None, calls: int = 1) -> None:
        """Work done by the innermost timed phase (the absorbing one, inside evaluation):
        `tokens` of model work of `kind` (see flops_per_token; None: no FLOPs)."""
        if not self.stack:
            return
        st = self.stats[self.stack[-1].name]
        st.tokens += int(tokens)
        st.flops += float(tokens) * self.flops_per_token(kind) if kind else 0.0
        st.calls += calls

    def see_model(self, model) -> None:
        if self.config is None and getattr(model, "config", None) is not None:
            self.config = model.config
            p = next(iter(model.parameters()), None)
            if p is not None:
                self.dtype = p.dtype
                if p.device.type == "cuda" and not self.stack:
                    self.device, self.cuda = p.device, True

    def flops_per_token(self, kind: str) -> float:
        """prefill: decoder layers only (the LM head runs on one position per row); decode and
        reference: forward incl. LM head; train: forward + backward through frozen weights
        (input gradients only: LoRA leaves the base weights without gradients), 2x forward;
        train_full: full fine-tuning also computes the weights' gradients, 3x forward."""
        if self.config is None:
            return 0.0
        body, head = matmul_params(self.config)
        return {"prefill": 2 * body, "forward": 2 * (body + head),
                "train": 4 * (body + head), "train_full": 6 * (body + head)}[kind]

    # ------------------------------------------------------------ report

    def report(self) -> dict:
        total = self.wall_s or 1e-9
        peak, peak_note = gpu_peak_flops(self.device, self.dtype)
        rows = []
        for key, label in PHASES:
            st = self.stats[key]
            rows.append({"phase": key, "label": label, **asdict(st),
                         "share": st.wall_s / total,
                         "tokens_per_s": st.tokens / st.wall_s if st.wall_s and st.tokens else None,
                         "mfu": st.flops / st.wall_s / peak if peak and st.wall_s and st.flops
                         else None,
                         "peak_mib": st.peak_bytes / 2**20 if st.calls or st.wall_s else None})
        other = max(0.0, total - sum(r["wall_s"] for r in rows))
        rows.append({"phase": "other", "label": "other (imports, tokenizing, files, plots)",
                     "wall_s": other, "share": other / total, "calls": 0, "tokens": 0,
                     "flops": 0.0, "tokens_per_s": None, "mfu": None, "peak_mib": None,
                     "peak_bytes": 0})
        return {"device": str(self.device), "device_name": device_name(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "wall_s": self.wall_s,
                "peak_flops": peak, "peak_note": peak_note,
                "memory": "CUDA allocator peak within the phase" if self.cuda else
                "max RSS of the process when the phase ended (a high-water mark)",
                "phases": rows}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def format_profile(rep: dict) -> str:
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    lines = ["| phase | wall s | share | calls | tokens | tokens/s | MFU | peak memory MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rep["phases"]:
        ran = r["calls"] or r["wall_s"] > 0
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
        lines.append(f"| {r['label']} | {r['wall_s']:.3f} | {100 * r['share']:.1f}% | "
                     f"{r['calls'] if ran else 'not run'} | {r['tokens'] or '—'} | "
                     f"{f(r['tokens_per_s'], '.1f')} | {mfu} | {f(r['peak_mib'], '.0f')} |")
    return "\n".join(lines)


def write_profile(rep: dict, out_dir: Path, trace: Path | None) -> Path:
    from malt_fast.malt.trees import atomic_write_text

    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "profile.json", json.dumps(rep, indent=2) + "\n")
    lines = [f"# Profile: {rep['wall_s']:.1f} s on {rep['device']} ({rep['device_name']}), "
             f"{rep['dtype']}, torch {rep['torch']}, {rep['threads']} threads", "",
             format_profile(rep), "",
             f"- MFU: {rep['peak_note']}; model FLOPs are 2·(weights) per token forward, "
             "4·(weights) per trained token (LoRA: no base-weight gradients), attention scores "
             "left out.",
             f"- peak memory: {rep['memory']}.",
             "- times are exclusive (reference log-probs are not in the DPO step); evaluation "
             "includes its own prefill and decode, so prefill and decode are the expansion's.",
             "- tokens: " + "; ".join(f"{label}: {TOKENS_MEAN[k]}" for k, label in PHASES) + "."]
    if trace is not None:
        calls = rep.get("trace_calls")
        kept = "every op" if calls is None else f"the ops of the first {calls} calls of each phase"
        lines.append(f"- trace: `{trace}` (open in https://ui.perfetto.dev or chrome://tracing; "
                     f"every phase call is a `malt/<phase>` range; it holds {kept}). Recorded "
                     "under torch.profiler, which slows small CPU ops, so absolute times run "
                     "high; `--no-trace` times the phases without it.")
    path = out_dir / "profile.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def profile_pipeline(cfg: dict, out_dir=None, trace: bool = True, trace_calls: int | None = 3,
                     log=print) -> dict:
    """Run the pipeline on `cfg` under the profiler; write the trace and tables into out_dir
    (default RUN_DIR/profile). Returns the report."""
    from torch.profiler import ProfilerActivity, profile

    from malt_fast.pipeline import run_pipeline

    if trace_calls is not None and trace_calls < 0:
        raise MaltError(f"--trace-calls: expected an integer >= 0, got {trace_calls}")
    out_dir = Path(out_dir or Path(cfg["run_dir"]) / "profile")
    out_dir.mkdir(parents=True, exist_ok=True)
    prof = Profiler(trace_calls if trace else None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    torch_prof = profile(activities=activities) if trace else contextlib.nullcontext()
    with collecting(prof), torch_prof as tp:
        prof.t0 = time.perf_counter()
        run_pipeline(cfg, log)
        prof._sync()
        prof.wall_s = time.perf_counter() - prof.t0
    trace_path = None
    if trace:
        trace_path = out_dir / "trace.json"
        tp.export_chrome_trace(str(trace_path))
    rep = prof.report()
    rep["trace"] = str(trace_path) if trace_path else None
    rep["trace_calls"] = trace_calls
    md = write_profile(rep, out_dir, trace_path)
    log(f"\nprofile ({rep['wall_s']:.1f} s on {rep['device']}, {rep['dtype']}):")
    log(format_profile(rep))
    log(f"  profile: {md}" + (f"\n  trace: {trace_path}" if trace_path else ""))
    return rep


def short_config(cfg: dict, questions: int = 4, run_dir=None) -> dict:
    """`malt-fast profile`: the config cut to a few questions, one evaluation seed, one round,
    in its own run directory (RUN_DIR-profile) so a real run's files are never touched."""
    if questions < 1:
        raise MaltError(f"--questions: expected an integer >= 1, got {questions}")
    c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    c["train_questions"] = min(c["train_questions"], questions)
    c["chunk_questions"] = min(c["chunk_questions"], c["train_questions"])
    c["evaluate"]["questions"] = min(c["evaluate"]["questions"], questions)
    c["evaluate"]["seeds"] = list(c["evaluate"]["seeds"][:1])
    c["rounds"] = 1
    c["credit"]["theta_schedule"] = None
    c["run_dir"] = str(run_dir or f"{str(cfg['run_dir']).rstrip('/')}-profile")
    return c


def fresh_run_dir(path) -> Path:
    """A profile measures a run from scratch: an earlier profile run's directory is replaced;
    any other non-empty directory is refused rather than deleted."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise MaltError(f"{path}: exists and is not a directory")
        if (path / MARKER).is_file():
            shutil.rmtree(path)
        elif any(path.iterdir()):
            raise MaltError(f"{path}: not empty and not made by `malt-fast profile`; "
                            "choose another --run-dir")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by malt-fast profile; replaced by the next one\n")
    return path
