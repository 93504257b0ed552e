"""The run config's one schema: every section and field with its type, range, default and one line
of help, checked before any model or dataset loads.

    cfg = read_run_config("configs/default.yaml", ["evaluate.questions=10"])   # a checked dict

`RunConfig` is `malt-fast run|expand|evaluate|profile|check`'s config, `TrainJob` is `malt-fast
train`'s, `TrainConfig` is the `train:` section both share (the trainer's own settings). Nested
sections merge field by field with their defaults (`sampling: {max_new_tokens: {generator: 48}}`
keeps the other roles' budgets), numbers may be written in any YAML spelling (PyYAML reads `5e-5`
as a string; it is a number here), and a bad value or unknown key is one line naming the file and
the dotted field, e.g. `run.yaml: field 'sampling.temperature': expected a number, got 'hot'`, or
`run.yaml: unknown field 'train.sft_lrr' (did you mean 'sft_lr'?)`.

docs/config.md is generated from these classes (`reference_markdown`); a test keeps it current.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool,
                      ValidationError, field_validator, model_validator)

from malt_fast.errors import MaltError, fail

ROLES = ("generator", "verifier", "refiner")
STAR = "star"  # the STaR baseline's single agent, trained like a fourth role
DTYPES = ("float32", "bfloat16", "float16", "auto")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")



def _not_bool(v):
    """YAML's true/false are ints to Python; where a number is expected they are a mistake."""
    if isinstance(v, bool):
        raise ValueError("expected a number, got a boolean")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
PosInt = Annotated[Int, Field(ge=1)]
NonNegInt = Annotated[Int, Field(ge=0)]


class _SectionType(type(BaseModel)):
    """Constructing a section in code (`TrainConfig(batch_size=0)`) raises a one-line MaltError,
    as a config file's check does. (Only direct calls: validating a file, or a section nested
    in one, never goes through the class call, so those errors keep their whole path.)"""

    def __call__(cls, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as e:
            raise MaltError(one_line(e, cls, prefix=cls.prefix)) from None


class Section(BaseModel, metaclass=_SectionType):
    """A config section: unknown keys are errors, values are checked and then frozen."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)
    prefix: ClassVar[str] = ""  # the section's name in messages of a direct construction


# ---------------------------------------------------------------- sections


class LoRASection(Section):
    rank: PosInt = Field(16, description="adapter rank r")
    alpha: Annotated[Float, Field(gt=0)] = Field(32.0, description="scale alpha (the update is "
                                                 "alpha / r times B A)")
    dropout: Annotated[Float, Field(ge=0, lt=1)] = Field(0.0, description="dropout on the "
                                                         "adapter's input")
    targets: tuple[str, ...] = Field(ALL_PROJECTIONS, description="the projections that get an "
                                     "adapter")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v):
        bad = [t for t in v if t not in ALL_PROJECTIONS]
        if bad or not v:
            raise ValueError(f"expected a non-empty list of {', '.join(ALL_PROJECTIONS)}")
        return v


class TrainConfig(Section):
    """The `train:` section: how each role is trained (docs/train.md)."""

    prefix: ClassVar[str] = "train"
    roles: tuple[Literal["generator", "verifier", "refiner", "star"], ...] = Field(
        ROLES, description="roles to train (a subset trains only those; `star`: the STaR "
                           "baseline)")
    finetune: Literal["lora", "full"] = Field("lora", description="lora: one adapter per role "
                                              "on a shared frozen base; full: a model copy per "
                                              "role")
    schedule: Literal["sequential", "joint"] = Field("sequential", description="sequential: "
                                                     "role after role; joint: one optimizer "
                                                     "step of each role in turn")
    packing: Literal["tree", "none"] = Field("tree", description="tree: a batch's shared prompts "
                                             "run once under an ancestor mask; none: one padded "
                                             "row per sequence")
    generator_dpo: StrictBool = Field(False, description="DPO for the generator too (the paper: "
                                      "SFT only)")
    sft_epochs: NonNegInt = Field(1, description="SFT passes over sft_{role}.jsonl")
    dpo_epochs: NonNegInt = Field(1, description="DPO passes over dpo_{role}.jsonl")
    sft_lr: Annotated[Float, Field(gt=0)] = Field(2e-4, description="SFT learning rate (AdamW, "
                                                  "warmup then linear decay)")
    dpo_lr: Annotated[Float, Field(gt=0)] = Field(5e-5, description="DPO learning rate")
    beta: Annotated[Float, Field(gt=0)] = Field(0.2, description="DPO beta (the paper: 0.2)")
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO-family "
                                                         "loss")
    batch_size: PosInt = Field(4, description="rows (DPO: pairs) per micro-batch, over all ranks")
    grad_accum: PosInt = Field(1, description="micro-batches per optimizer step")
    max_len: Annotated[Int, Field(ge=2)] = Field(1024, description="longer sequences are cut "
                                                 "from the completion's end")
    warmup_steps: NonNegInt = Field(0, description="linear warmup steps")
    weight_decay: Annotated[Float, Field(ge=0)] = Field(0.0, description="AdamW weight decay")
    save_every: PosInt = Field(50, description="checkpoint every N optimizer steps (and at each "
                                               "phase end)")
    seed: NonNegInt = Field(0, description="training seed (`malt-fast run`: defaults to the "
                                           "run's seed)")
    lora: LoRASection = Field(default_factory=LoRASection, description="LoRA settings")
    backend: Literal["triton", "cpu", "torch"] | None = Field(None, description="fused log-prob "
                                                               "kernel; null picks by device")
    tensorboard: StrictBool = Field(True, description="event files under OUT/tensorboard")

    @field_validator("roles", mode="before")
    @classmethod
    def _roles_list(cls, v):
        return (v,) if isinstance(v, str) else v

    @field_validator("roles")
    @classmethod
    def _roles_once(cls, v):
        if not v:
            raise ValueError("expected at least one role")
        if len(set(v)) != len(v):
            raise ValueError("lists a role twice")
        return v

    def phases(self, role: str) -> list[str]:
        if role == STAR or (role == "generator" and not self.generator_dpo):
            return ["sft"]
        return ["sft", "dpo"]


class RunTrain(TrainConfig):
    """The `train:` section of a run config: its seed defaults to the run's (round's) seed."""

    seed: NonNegInt | None = Field(None, description="training seed; null = the run's seed (round "
                                                     "r: seed + 1000 (r - 1))")
    seeds: list[NonNegInt] | None = Field(None, description="train the roles (and STaR) once per "
                                          "seed, from the same trees, and evaluate each; the "
                                          "table then averages over training x evaluation seeds")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("expected a non-empty list of distinct integers")
        return v


class RoleBudgets(Section):
    generator: PosInt = Field(160, description="generator turn")
    verifier: PosInt = Field(128, description="verifier turn")
    refiner: PosInt = Field(160, description="refiner turn")


class SamplingSection(Section):
    temperature: Annotated[Float, Field(ge=0)] = Field(0.3, description="sampling temperature "
                                                       "of every role, expansion and evaluation "
                                                       "(the paper: 0.3; 0 = greedy)")
    top_p: Annotated[Float, Field(gt=0, le=1)] = Field(1.0, description="nucleus sampling")
    top_k: NonNegInt = Field(0, description="top-k sampling (0 = off)")
    stop_after_answer: StrictBool = Field(True, description="the generator's and refiner's "
                                          "replies end with their `Final Answer:` line, the "
                                          "verifier's with its `Verdict:` line")
    max_new_tokens: RoleBudgets = Field(default_factory=RoleBudgets, description="token budget "
                                        "per role, or one number for all; a reply that reaches it "
                                        "is cut (`credit.cut_replies`)")

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _one_for_all(cls, v):
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            return {role: v for role in ROLES}
        return v


class EngineSection(Section):
    max_batch: PosInt = Field(64, description="decode slots per engine")
    cache_tokens: PosInt = Field(24576, description="KV-cache pool per engine, in tokens")
    multi_adapter: StrictBool = Field(False, description="trained LoRA roles (and STaR's "
                                      "agent) share one engine: the base weights and one KV pool "
                                      "held once, rows of every role in the same decode steps, "
                                      "each through its adapter; false: one engine per role (see "
                                      "merge_adapters), the faster on CPU "
                                      "(benchmarks/results/rollout.md)")
    merge_adapters: StrictBool = Field(True, description="with one engine per role (full "
                                       "fine-tuning, or multi_adapter: false), a trained LoRA "
                                       "role decodes a merged copy of its weights (faster); "
                                       "false: through the adapter on the one shared base (less "
                                       "memory)")


class ThetaLinear(Section):
    start: Float = Field(description="round 1's threshold")
    end: Float = Field(description="the last round's threshold")


class CreditSection(Section):
    theta: Annotated[Float, Field(ge=0, lt=1)] = Field(0.5, description="a node is positive iff "
                                                       "its value V > theta (strict)")
    pairs: Literal["all", "max_k", "one"] = Field("all", description="DPO pairs per parent: "
                                                  "every positive x negative sibling pair, at "
                                                  "most max_pairs, or one")
    max_pairs: PosInt | None = Field(None, description="the cap of pairs: max_k")
    theta_schedule: Union[list[Float], ThetaLinear, None] = Field(
        None, description="per-round thresholds: a list (one per round) or {start, end} "
                          "(linear); overrides theta")
    cut_replies: Literal["drop", "keep"] = Field("drop", description="replies cut by the token "
                                                 "budget: never trained on (drop), or trained as "
                                                 "open turns without end-of-turn (keep)")
    recipe: Literal["paper", "correction"] = Field(
        "paper", description="how values and training rows are made (docs/malt.md, credit "
                             "recipes): the paper's, or `correction`: a critique valued by "
                             "whether its verdict matches the generation's correctness, the "
                             "refiner trained mostly on wrong generations")
    verdict_weight: Annotated[Float, Field(ge=0, le=1)] = Field(
        1.0, description="correction: the verdict's share of a critique's value (the rest: "
                         "the mean of its refinements)")
    copy_share: Annotated[Float, Field(ge=0, lt=1)] = Field(
        0.2, description="correction: at most this share of the refiner's SFT rows and DPO "
                         "pairs come from right generations (mostly copies)")

    @field_validator("theta_schedule", mode="before")
    @classmethod
    def _schedule_shape(cls, v):
        if v is None or isinstance(v, list):
            return v
        if isinstance(v, dict) and set(v) == {"start", "end"}:
            return v
        raise ValueError("expected a list (one threshold per round) or {start: THETA, end: "
                         f"THETA}}, got {v!r}")

    @model_validator(mode="after")
    def _pairing(self):
        if self.pairs == "max_k" and self.max_pairs is None:
            raise ValueError("max_pairs: pairs 'max_k' needs it")
        if self.pairs != "max_k" and self.max_pairs is not None:
            raise ValueError(f"max_pairs: only used with pairs 'max_k' (pairs is {self.pairs!r})")
        return self


class EvaluateSection(Section):
    seeds: list[NonNegInt] = Field([0, 1, 2], description="evaluation seeds; each picks its "
                                   "question subset and chain samples")
    questions: PosInt = Field(30, description="test questions per seed")
    chains: PosInt = Field(3, description="independent G->V->R chains per question (MV@3 votes "
                                          "over them)")
    star: StrictBool = Field(False, description="also train and evaluate the STaR baseline")
    refine: Literal["always", "flagged"] = Field(
        "always", description="which generations the refiner rewrites: every one (the paper), "
                              "or only those its verifier's verdict flags (an unflagged "
                              "chain's answer is its generation's)")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("expected a non-empty list of distinct integers")
        return v


class DeepSpeedSection(Section):
    config: Path = Field(description="DeepSpeed JSON (configs/deepspeed/*.json)")
    nproc: PosInt = Field(1, description="processes torchrun starts for the train stage")


def _deepspeed_entry(v):
    """A JSON path is short for {config: path}."""
    return {"config": v} if isinstance(v, (str, Path)) else v


class DatasetFiles(Section):
    train: str = Field(description="JSONL file of the training questions")
    test: str = Field(description="JSONL file of the test questions")


def _device(v):
    if v == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", str(v)):
        return v
    raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")


Device = Annotated[str, AfterValidator(_device)]
DeepSpeedEntry = Annotated[Union[DeepSpeedSection, None], BeforeValidator(_deepspeed_entry)]


class RunConfig(Section):
    """The config of `malt-fast run` (and expand, evaluate, profile, check)."""

    run_dir: str = Field("runs/default", description="where everything is written "
                         "(`--run-dir` overrides)")
    model: str | None = Field(None, description="HF Llama directory or .gguf file; null = the "
                              "packaged SmolLM2-135M-Instruct")
    tokenizer: str | None = Field(None, description="tokenizer.json / tokenizer.model directory "
                                  "or .gguf; null = the model path")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="dtype the model is loaded in; auto = bf16 on CUDA and on CPUs "
                               "with native bf16, else fp32")
    device: Device = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    threads: NonNegInt = Field(0, description="torch CPU threads; 0 keeps torch's default")
    seed: NonNegInt = Field(0, description="run seed: expansion chunks, DPO pair sampling, "
                                           "training, the arith generator")
    dataset: Union[str, DatasetFiles] = Field(
        "arith", description="packaged name (gsm8k, math, csqa, svamp, asdiv, mawps, arith), a "
                             ".jsonl file whose rows have a `split` field, or {train: FILE, test: "
                             "FILE}")
    difficulty: PosInt = Field(1, description="difficulty of the generated arith task")
    train_split: str = Field("train", description="split the training questions come from (not "
                             "used with {train, test} files)")
    test_split: str = Field("test", description="split evaluation draws from (not used with "
                            "{train, test} files)")
    train_questions: PosInt = Field(24, description="the first N training questions are "
                                                    "expanded")
    prompts: str | None = Field(None, description="role prompts YAML; null = "
                                "configs/prompts.yaml")
    n: PosInt = Field(3, description="branches per level: n generations, n critiques of each, "
                                     "n refinements of each")
    chunk_questions: PosInt = Field(8, description="questions expanded together (one seed per "
                                                   "chunk)")
    rounds: PosInt = Field(1, description="iterative MALT: expand -> credit -> train this many "
                                          "times")
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="sampling")
    engine: EngineSection = Field(default_factory=EngineSection, description="rollout engine")
    credit: CreditSection = Field(default_factory=CreditSection, description="credit assignment")
    train: RunTrain = Field(default_factory=RunTrain, description="training (docs/train.md)")
    deepspeed: DeepSpeedEntry = Field(None, description="a DeepSpeed JSON path or "
                                               "{config, nproc}: train under torchrun, one "
                                               "engine per role")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="evaluation")

    @model_validator(mode="after")
    def _schedule(self):
        round_thetas(self)  # raises for a schedule that does not fit `rounds`
        if self.train.seeds is not None and self.rounds > 1:
            raise ValueError("train.seeds: one training seed per round only (round r + 1 starts "
                             "from round r's roles); set rounds: 1 or drop train.seeds")
        return self


class TrainJob(Section):
    """The config of `malt-fast train`: a base model, the SFT/DPO sets and where to write."""

    model: str | None = Field(None, description="HF Llama directory or .gguf; null = the "
                              "packaged SmolLM2-135M-Instruct")
    tokenizer: str | None = Field(None, description="defaults to the model path")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32",
                                                                     description="model dtype")
    device: Device = Field("cpu", description="cpu, cuda or cuda:N (auto: CUDA when available)")
    data: str = Field(description="directory with sft_{role}.jsonl, dpo_{role}.jsonl")
    out: str = Field(description="checkpoints, state and metrics go here")
    init: str | None = Field(None, description="a directory of trained roles to start from")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training")
    deepspeed: DeepSpeedEntry = Field(None, description="train under DeepSpeed (a JSON path or "
                                      "{config, nproc})")


def round_thetas(cfg) -> list[float]:
    """The credit threshold of each round (`cfg`: a RunConfig or its dict)."""
    d = cfg if isinstance(cfg, dict) else cfg.model_dump()
    k, sched = d["rounds"], d["credit"]["theta_schedule"]
    if sched is None:
        return [d["credit"]["theta"]] * k
    if isinstance(sched, list):
        if len(sched) != k:
            raise ValueError(f"credit.theta_schedule: has {len(sched)} thresholds, rounds is "
                             f"{k} (one threshold per round)")
        thetas = [float(t) for t in sched]
    else:
        a, b = sched["start"], sched["end"]
        # rounded so 0.5 -> 0.75 over 3 rounds gives 0.625, not 0.6250000000000001 (credit
        # compares exact fractions of the value's decimal text)
        thetas = [a if k == 1 else round(a + (b - a) * r / (k - 1), 10) for r in range(k)]
    if not all(0 <= t < 1 for t in thetas):
        raise ValueError("credit.theta_schedule: thresholds must be numbers in [0, 1)")
    return thetas


# ---------------------------------------------------------------- errors


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false",
               "string": "a string", "dict": "a mapping", "model": "a mapping",
               "list": "a list", "tuple": "a list"}


def one_line(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first error of a pydantic ValidationError as `field 'a.b': problem, got VALUE`."""
    errors = err.errors(include_url=False)
    # a value that fits no member of a union fails once per member: report the member it was
    # meant for (the error that is not about the value's type), if there is one
    e = next((x for x in errors if not x["type"].endswith(("_type", "_parsing"))
              and x["type"] != "extra_forbidden" or x["type"] == "missing"), errors[0]) \
        if len(errors) > 1 else errors[0]
    kind = e["type"]
    loc = _field_path(model, e["loc"][:-1]) + [str(e["loc"][-1])] \
        if kind == "extra_forbidden" else _field_path(model, e["loc"])
    path = ".".join(([prefix] if prefix else []) + loc)
    if kind == "extra_forbidden":
        parent, _, key = path.rpartition(".")
        known = field_names(model, loc[:-1])
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(known)})"
        return f"unknown field '{path}'{hint}"
    if kind == "missing":
        return f"field '{path}': missing"
    msg = e["msg"]
    if kind in ("value_error", "assertion_error"):
        msg = msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion")) else msg
        if ": " in msg and msg.split(": ", 1)[0].replace(".", "").replace("_", "").isalpha() \
                and " " not in msg.split(": ", 1)[0]:
            inner, msg = msg.split(": ", 1)  # a model validator naming its own field
            path = ".".join(filter(None, [path, inner]))
        return f"field '{path}': {msg}"
    base = kind.split("_")[0]
    ctx = e.get("ctx") or {}
    if kind.endswith(("_parsing", "_type")) and base in _TYPE_WORDS or kind == "int_from_float":
        msg = f"expected {_TYPE_WORDS[base]}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        info = _field_info(model, loc)
        what = "an integer" if info is not None and "int" in str(info.annotation) \
            and "float" not in str(info.annotation) else "a number"
        msg = f"expected {what} {_BOUNDS[kind]} {bound}"
    elif kind == "literal_error":
        msg = "expected " + msg.removeprefix("Input should be ").replace("'", "")
    else:
        msg = msg.replace("Input should be", "expected")
    return f"field '{path}': {msg}, got {e.get('input')!r}"


def _field_path(model, loc) -> list[str]:
    """pydantic's error location without its union-member and validator tags: field names (a
    section's fields after it) and list indices."""
    out = []
    for item in loc:
        fields = model.model_fields if model is not None else {}
        if isinstance(item, int) or str(item).isdigit():
            out.append(str(item))
        elif item in fields:
            out.append(item)
            model = _section_type(fields[item].annotation)
        elif model is None or not fields:
            out.append(str(item))  # inside a dict: a key
    return out


def _field_info(model: type[BaseModel], loc: list[str]):
    """The FieldInfo at `loc` (list items and dict keys skipped), or None."""
    info = None
    for name in loc:
        if model is None:
            return info
        info = model.model_fields.get(name)
        if info is None:
            return None
        model = _section_type(info.annotation)
    return info


def field_names(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the section at `loc` inside `model`."""
    for name in loc:
        info = model.model_fields.get(name)
        sub = _section_type(info.annotation) if info else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _section_type(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def validate(model: type[Section], data: Any, source, prefix: str = "") -> Section:
    """`data` checked against `model` (the section called `prefix` in messages, if it is one);
    a problem is one MaltError line naming `source`."""
    if not isinstance(data, dict):
        if prefix:
            raise fail(source, f"field '{prefix}': expected a mapping, got {data!r}")
        raise fail(source, f"expected a mapping of fields at the top level, got "
                           f"{type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise fail(source, one_line(e, model, prefix)) from None


def deepspeed_spec(entry, source) -> DeepSpeedSection:
    """A config's `deepspeed:` entry (a JSON path, or {config, nproc}) checked."""
    if isinstance(entry, DeepSpeedSection):
        return entry
    return validate(DeepSpeedSection, _deepspeed_entry(entry), source, prefix="deepspeed")


# ---------------------------------------------------------------- files


def read_yaml(path, overrides: list[str] = ()) -> dict:
    """A YAML config with `key.sub=value` overrides (values parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise fail(path, "no such config file")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise fail(path, f"invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise fail(path, f"expected a mapping of fields at the top level, got "
                         f"{type(cfg).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MaltError(f"--set {item}: expected key=value")
        node = cfg
        *parents, leaf = key.split(".")
        for k in parents:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise MaltError(f"--set {item}: '{k}' is not a section")
            node = child
        node[leaf] = yaml.safe_load(value)
    return cfg


def run_dict(cfg: dict, source="config") -> dict:
    """A run config checked against the schema: every field present, as a plain dict."""
    return validate(RunConfig, cfg, source).model_dump(mode="json")


def train_config(cfg: dict, seed: int | None = None) -> TrainConfig:
    """A checked run config's `train:` section as the trainer's TrainConfig; its seed is the
    section's own, else `seed` (the round's), else the run's."""
    train = {k: v for k, v in cfg["train"].items() if k != "seeds"}
    if train["seed"] is None:
        train["seed"] = cfg["seed"] if seed is None else seed
    return TrainConfig(**train)


# ---------------------------------------------------------------- reference


def reference_markdown() -> str:
    """docs/config.md: every field of both configs with type, default and help."""
    out = ["# Config reference", "",
           "Generated from `malt_fast/config.py` (`python -m malt_fast.config > docs/config.md`); "
           "a test checks that it is current. Every field is optional unless its default says "
           "*required*. Check a config with `malt-fast check CONFIG`.", ""]
    for title, model in (("`malt-fast run` (and expand, evaluate, profile, check)", RunConfig),
                         ("`malt-fast train`", TrainJob)):
        out += [f"## {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(model, "")
        out.append("")
    return "\n".join(out)


def _rows(model, prefix) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
            rows.append(f"| `{path}` | section | | {info.description} |")
            rows += _rows(info.annotation, path + ".")
            continue
        if info.is_required():
            default = "*required*"
        else:
            value = info.get_default(call_default_factory=True)
            value = value.model_dump() if isinstance(value, BaseModel) else value
            default = "null" if value is None else f"`{_plain(value)}`"
        rows.append(f"| `{path}` | {_type_name(info.annotation)} | {default} | "
                    f"{info.description} |")
    return rows


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _type_name(annotation) -> str:
    """A type as a reader would say it: `int`, `number`, `a / b`, `list of int`, `X or null`."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    names = {int: "int", float: "number", str: "string", bool: "true/false", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


if __name__ == "__main__":
    print(reference_markdown(), end="")
