"""The command line end to end on tiny models, and the demo's code path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import write_tiny_gguf

from undial_peft.cli import main
from undial_peft.data.packaged import demo_facts
from undial_peft.demo import run_demo
from undial_peft.tiny import tiny_llama, word_tokenizer
from undial_peft.utils.storage import file_sha256


def test_forget_verb_writes_a_complete_adapter(tiny_dir, facts, tmp_path, capsys):
    data = tmp_path / "forget.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in facts[:4]), encoding="utf-8")
    out = tmp_path / "adapters" / "req-001"
    code = main(["forget", "--model", tiny_dir, "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--beta", "3", "--quiet", "--description", "four fictitious birthplaces"])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "undial.json"]
    manifest = json.loads((out / "undial.json").read_text())
    assert manifest["hyperparameters"]["beta"] == 3.0 and manifest["metrics"]["steps"] == 2
    assert manifest["weights_sha256"] == file_sha256(out / "adapter_model.safetensors")
    assert "four fictitious birthplaces" in (out / "README.md").read_text()
    assert not list(out.parent.glob(".req-001*")), "temporary or checkpoint folders left behind"
    # a second run to the same name is refused and leaves the first untouched
    code = main(["forget", "--model", tiny_dir, "--data", str(data), "--out", str(out), "--max-steps", "1", "--quiet"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert json.loads((out / "undial.json").read_text()) == manifest


def test_demo_code_path_on_a_tiny_model(tmp_path):
    facts = demo_facts()
    assert {f["split"] for f in facts} == {"forget", "keep"} and all(f["key"] in f["answer"] for f in facts)
    tokenizer = word_tokenizer([f["question"] + " " + f["answer"] for f in facts])
    model_dir = tmp_path / "model"
    tiny_llama(tokenizer, hidden_size=32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines: list[str] = []
    result = run_demo(model=str(model_dir), output_dir=tmp_path / "demo", epochs=1, log=lines.append)
    assert (tmp_path / "demo" / "undial.json").is_file()
    assert len(result["rows"]) == len(facts)
    assert {"forget_p_before", "keep_p_after", "forget_p_key_after"} <= set(result["summary"])
    assert any("key probability" in line for line in lines)
    assert all(0.0 <= row[key] <= 1.0 for row in result["rows"] for key in ("p_before", "p_after", "p_key_after"))


def test_help_is_clean(tmp_path):
    """`undial-peft --help` prints usage only, no library warnings. Building the parser imports
    transformers (UndialConfig's defaults), hence peft's bitsandbytes: on AVX512-BF16 CPUs this also
    checks that bitsandbytes' 'kernels' notice is filtered for the command line."""
    probe = "from undial_peft.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}  # show every warning once
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: undial-peft"), run.stdout
    assert run.stderr == "", run.stderr


BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def test_bitsandbytes_kernels_notice_is_dropped_and_nothing_else(caplog):
    """Importing undial_peft filters bitsandbytes' 'kernels' notice on its logger; other records of
    that logger still pass. (Emitted by hand here: bitsandbytes logs it only on AVX512-BF16 CPUs.)"""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        bnb_logger.warning(BNB_NOTICE + ": %s. Please make sure you already `pip install kernels`", "no network")
        bnb_logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


@pytest.mark.parametrize("how", ["library", "cli --4bit"])
def test_forget_prints_no_bitsandbytes_kernels_notice(how, tiny_dir, facts, tmp_path):
    """The library API (which imports peft, and so bitsandbytes) and a --4bit run from the command
    line print no 'kernels' notice on CPUs where bitsandbytes logs one at import."""
    pytest.importorskip("bitsandbytes")
    data = tmp_path / "forget.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in facts[:2]), encoding="utf-8")
    if how == "library":
        command = ["-c", "from undial_peft import UndialConfig, forget\n"
                   f"forget({tiny_dir!r}, {str(data)!r}, {str(tmp_path / 'r')!r}, "
                   "config=UndialConfig(max_steps=1, disable_tqdm=True, report_to='none'))\n"]
    else:
        command = ["-m", "undial_peft.cli", "forget", "--4bit", "--model", tiny_dir, "--data", str(data),
                   "--out", str(tmp_path / "r"), "--max-steps", "1", "--quiet"]
    run = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert BNB_NOTICE not in run.stdout + run.stderr, run.stderr


@pytest.mark.parametrize("base", ["directory", "gguf --4bit"])
def test_forget_verb_prints_nothing_a_user_cannot_act_on(base, tiny_dir, facts, tmp_path):
    """A whole training run from the command line with --quiet: our own INFO lines only, no library
    deprecation warnings or third-party INFO chatter, and no progress bar at all. The GGUF --4bit
    run draws the most bars (de-quantising the GGUF, loading weights twice, writing the staged
    checkpoint) and imports bitsandbytes. (Checkpointing is left to the directory run: on a 4-bit
    base, peft's prepare_model_for_kbit_training raises deprecation and use_reentrant warnings of its own.)"""
    if base == "directory":
        model = [tiny_dir, "--gradient-checkpointing"]
    else:
        pytest.importorskip("bitsandbytes")
        model = [str(write_tiny_gguf(tmp_path / "tiny.gguf")), "--4bit"]
    data = tmp_path / "forget.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in facts[:2]), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    run = subprocess.run([sys.executable, "-m", "undial_peft.cli", "forget", "--model", *model, "--data", str(data),
                          "--out", str(tmp_path / "r"), "--max-steps", "1", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [part for line in run.stderr.splitlines() for part in line.split("\r") if part.strip()]  # a bar redraws with \r
    noise = [line for line in lines if not line.startswith(("INFO undial_peft", "WARNING undial_peft"))]
    assert noise == [], noise


def test_eval_asks_in_the_prompt_format_the_adapter_recorded(tiny_dir, facts, tmp_path, capsys):
    data = tmp_path / "forget.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in facts[:2]), encoding="utf-8")
    out, report = tmp_path / "req-001", tmp_path / "report.json"
    assert main(["forget", "--model", tiny_dir, "--data", str(data), "--out", str(out), "--max-steps", "1",
                 "--quiet", "--prompt-template", "Q: {prompt} A:"]) == 0
    recorded = json.loads((out / "undial.json").read_text())["prompt_format"]
    assert recorded == {"kind": "template", "template": "Q: {prompt} A:"}
    assert main(["eval", "--model", tiny_dir, "--adapters", str(out), "--forget", str(data), "--out", str(report),
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(report.read_text())["prompt_format"] == recorded
    assert main(["eval", "--model", tiny_dir, "--adapters", str(out), "--forget", str(data), "--out", str(report),
                 "--max-new-tokens", "2", "--prompt-format", "completion"]) == 0
    assert json.loads(report.read_text())["prompt_format"]["kind"] == "completion"
