"""A run config checked before anything runs: its schema (defaults filled in), its DeepSpeed
JSON, and every file it names (model, tokenizer, dataset splits, prompts), without loading any
weights. A problem is a MaltError naming the config file and the field."""

from __future__ import annotations

from pathlib import Path

import torch

from malt_fast.config import run_dict, train_config
from malt_fast.errors import MaltError


def resolve(cfg: dict, source="config") -> dict:
    """The run config checked against its schema (malt_fast.config): defaults filled in, a bad
    field a MaltError naming `source` and the field. A DeepSpeed JSON is checked now too, not
    after an expansion that may take hours."""
    out = run_dict(cfg, source)
    if out["deepspeed"] is not None:
        from malt_fast.train.distributed import parse_spec, read_ds_config, resolve_ds_config

        spec = parse_spec(out["deepspeed"], source)
        resolve_ds_config(read_ds_config(spec.config), spec.config, train_config(out),
                          spec.nproc, cuda=torch.cuda.is_available())
    return out


def check_inputs(cfg: dict, source="config") -> dict:
    """Every path the run will read, resolved and checked without loading any weights: the model
    and tokenizer exist, the dataset's splits load and share no question, the prompts parse for
    the dataset's family. Returns {model, tokenizer, prompts, train_questions,
    test_questions}; a problem is a MaltError naming `source` and the field."""
    from malt_fast.data import check_disjoint, load_split, smollm2_gguf
    from malt_fast.malt.prompts import DEFAULT_PATH, load_prompts, prompt_family

    def model_path(field, value):
        path = Path(value)
        if not (path.is_dir() and (path / "config.json").is_file()
                or path.is_file() and path.suffix == ".gguf"):
            raise MaltError(f"{source}: field '{field}': {value} is not a Hugging Face model "
                            "directory (config.json) or a .gguf file")
        return path

    def tokenizer_path(value):
        path = Path(value)
        files = ("tokenizer.json", "tokenizer.model")
        if not (path.is_file() and path.suffix == ".gguf"
                or path.is_dir() and any((path / f).is_file() for f in files)):
            raise MaltError(f"{source}: field 'tokenizer': {value} has no tokenizer.json or "
                            "tokenizer.model (nor is it a .gguf file)")
        return path

    model = model_path("model", cfg["model"]) if cfg["model"] else smollm2_gguf()
    tokenizer = tokenizer_path(cfg["tokenizer"] or model)
    ds = cfg["dataset"]
    split = {w: w if isinstance(ds, dict) else cfg[f"{w}_split"] for w in ("train", "test")}
    try:
        train, test = (load_split(ds, split[w], difficulty=cfg["difficulty"], seed=cfg["seed"])
                       for w in ("train", "test"))
    except MaltError as e:
        raise MaltError(f"{source}: field 'dataset': {e}") from None
    check_disjoint(train, test, f"{source}: field 'dataset'")
    if not train or not test:
        raise MaltError(f"{source}: field 'dataset': the {'training' if not train else 'test'} "
                        "split is empty")
    prompts = Path(cfg["prompts"]) if cfg["prompts"] else DEFAULT_PATH
    try:
        load_prompts(prompts, prompt_family(train[0].dataset, train[0].choices))
    except MaltError as e:
        raise MaltError(f"{source}: field 'prompts': {e}") from None
    return {"model": str(model), "tokenizer": str(tokenizer), "prompts": str(prompts),
            "train_questions": len(train), "test_questions": len(test)}
