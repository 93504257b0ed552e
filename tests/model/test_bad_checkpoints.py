"""Bad checkpoints end with one MaltError line that names the file and the problem."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from malt_fast.errors import MaltError
from malt_fast.model import load_model


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_path(tmp_path):
    with pytest.raises(MaltError, match=r"nope: no such file or directory"):
        load_model(tmp_path / "nope")


def test_not_llama(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MaltError, match=r"config.json: architecture mistral is not supported"):
        load_model(hf_dir)


def test_shape_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MaltError, match=r"tensor layers.0.mlp.gate_proj.weight has shape \(64, 32\), "
                                        r"the config implies \(48, 32\)"):
        load_model(hf_dir)


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaltError, match=r"model.safetensors: unreadable safetensors file"):
        load_model(hf_dir)


def test_missing_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(MaltError, match=r"no model.safetensors or model.safetensors.index.json"):
        load_model(hf_dir)


def test_truncated_gguf(tmp_path, smollm_gguf):
    cut = tmp_path / "cut.gguf"
    with open(smollm_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(5_000_000))
    with pytest.raises(MaltError, match=r"cut.gguf: not a readable GGUF file"):
        load_model(cut)


def test_cli_prints_one_line_without_traceback(tmp_path):
    shutil.copy(__file__, tmp_path / "missing.gguf")  # not GGUF at all
    proc = subprocess.run([sys.executable, "-m", "malt_fast.cli", "demo", "--model",
                           str(tmp_path / "missing.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.gguf: not a readable GGUF file" in lines[0] and "Traceback" not in proc.stderr
