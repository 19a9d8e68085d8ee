"""A merged model is not its base (fingerprint + linear-weight sample), and stack commands run
without --model find the base the manifests name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from undial_peft import UndialConfig
from undial_peft.cli import main as cli_main
from undial_peft.deploy.manifest import MANIFEST, read_manifest, verify_stack
from undial_peft.deploy.stack import attach, merge_stack
from undial_peft.errors import UndialStackError
from undial_peft.models import fingerprint, load_model
from undial_peft.training.forget import forget


@pytest.fixture(scope="module")
def r0(tiny_dir, facts, tmp_path_factory) -> Path:
    """A few large steps: enough to move every LoRA'd weight well past bf16 rounding."""
    config = UndialConfig(max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4, disable_tqdm=True,
                          logging_steps=1000, report_to="none")
    return forget(tiny_dir, facts[:4], tmp_path_factory.mktemp("identity") / "r0", config=config)


def test_a_merged_model_is_refused_as_base_of_its_own_stack(r0, tiny_dir, tmp_path):
    merged = merge_stack(tiny_dir, [r0], tmp_path / "merged")
    assert fingerprint(load_model(merged)[0]) != fingerprint(load_model(tiny_dir)[0])
    with pytest.raises(UndialStackError, match="different base model"):
        attach(merged, [r0])  # would apply r0 twice
    assert len(attach(merged, [r0], force=True).active_adapters) == 1  # deliberate: still possible


def test_a_copy_merged_by_plain_peft_is_refused_by_its_linear_weights(r0, tiny_dir, tmp_path):
    _, tokenizer = load_model(tiny_dir)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(r0)).merge_and_unload()
    plain.save_pretrained(tmp_path / "plain")  # no record of the stack: embeddings and config as the base's
    tokenizer.save_pretrained(tmp_path / "plain")
    assert fingerprint(plain) == fingerprint(load_model(tiny_dir)[0])
    with pytest.raises(UndialStackError, match="linear weights differ"):
        attach(tmp_path / "plain", [r0])


def test_fp32_bf16_and_4bit_loads_of_the_base_still_pass(r0, tiny_dir):
    from undial_peft.models import base_identity

    verify_stack([r0], base_identity(load_model(tiny_dir, dtype=torch.bfloat16)[0]))
    pytest.importorskip("bitsandbytes")
    verify_stack([r0], base_identity(load_model(tiny_dir, load_in_4bit=True)[0]))  # 4-bit layers not compared


def test_stack_export_and_merge_without_model_use_the_recorded_base(r0, tiny_dir, tmp_path, capsys):
    assert cli_main(["stack", "export", "--out", str(tmp_path / "e"), str(r0)]) == 0, capsys.readouterr().err
    assert cli_main(["stack", "merge", "--out", str(tmp_path / "m"), str(r0)]) == 0, capsys.readouterr().err
    assert read_manifest(r0)["base"]["source"] == str(Path(tiny_dir).resolve())
    assert read_manifest(tmp_path / "e")["base"]["source"] == str(Path(tiny_dir).resolve())
    # an adapter trained on a loaded model records no source: the error says to pass --model
    orphan = tmp_path / "orphan"
    shutil.copytree(r0, orphan)
    manifest = read_manifest(orphan)
    manifest["base"]["source"] = None
    (orphan / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    assert cli_main(["stack", "export", "--out", str(tmp_path / "e2"), str(orphan)]) == 2
    assert "pass the base with --model" in capsys.readouterr().err


def test_linear_sample_reaches_the_last_value_of_a_large_weight():
    # SmolLM2's tied head is 49152 x 576 = 28,311,552 values: a float32 linspace to the last index
    # rounds up past the end. The sample must include the last value and stay in bounds.
    from undial_peft.models import linear_sample

    head = torch.nn.Linear(576, 49152, bias=False)
    before = linear_sample(head)
    with torch.no_grad():
        head.weight[-1, -1] += 1.0  # only the last value changes
    assert linear_sample(head)["sha256"] != before["sha256"]
