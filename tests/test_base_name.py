"""Adapter configs name their base portably: the hub id for the embedded default, the file name for
a GGUF file, the given path otherwise, never a path inside this machine's Python environment.

The default and GGUF cases load the tiny model in place of the real file (from_pretrained is
patched), so the test runs in seconds and without the embedded model.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from undial_peft import UndialConfig, models
from undial_peft.deploy.manifest import CONFIG
from undial_peft.training.forget import forget


@pytest.mark.parametrize(("spec", "recorded"), [
    ("default", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("models/tiny.Q8_0.gguf", "tiny.Q8_0.gguf"),
    ("tiny_dir", "tiny_dir"),
])
def test_adapter_config_records_a_portable_base_name(spec, recorded, tiny_dir, facts, tmp_path, monkeypatch):
    if spec == "tiny_dir":
        spec = recorded = tiny_dir
    else:
        gguf_file = tmp_path / ("pkg/SmolLM2-135M-Instruct.Q4_1.gguf" if spec == "default" else spec)
        gguf_file.parent.mkdir(parents=True)
        gguf_file.write_bytes(b"")  # only its name matters: loading is redirected to the tiny model
        spec = spec if spec == "default" else str(gguf_file)
        monkeypatch.setattr(models, "default_model_path", lambda: gguf_file)
        load_model, load_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
        monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda source, **_: load_model(tiny_dir))
        monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda source, **_: load_tokenizer(tiny_dir))
    config = UndialConfig(max_steps=1, per_device_train_batch_size=2, disable_tqdm=True)
    out = forget(spec, facts[:2], tmp_path / "adapter", config=config)
    assert json.loads((out / CONFIG).read_text())["base_model_name_or_path"] == recorded
