"""Failure modes end to end: bad config, CLI user errors, a killed run and --resume, NaN losses,
racing writers, and that no forget text reaches the disk or the logs.

The interrupted run: ``undial-peft forget`` runs in a subprocess with ``--save-steps 2`` on top of a
one-adapter stack; it parks inside step 5 (after checkpoint-4 is saved) and is killed with SIGKILL.
A partial checkpoint-6 is then planted, as if the kill had hit the save. ``--resume`` must skip it,
continue from checkpoint-4 and give the adapter an uninterrupted run gives: resuming restores the
adapter, optimizer, scheduler, RNG and data order, so the weights are bit-identical on one machine
with one thread count; the test allows 1e-6 for last-bit differences between BLAS builds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import forget_text, leak_hits, leak_scan
from peft import LoraConfig
from safetensors.torch import load_file

from undial_peft import UndialConfig
from undial_peft.cli import main as cli_main
from undial_peft.data.digests import data_digest, key_id
from undial_peft.data.readers import read_examples
from undial_peft.deploy.manifest import MANIFEST, WEIGHTS
from undial_peft.errors import UndialConfigError, UndialModelError, UndialStackError, UndialTrainingError
from undial_peft.models import load_model
from undial_peft.training import forget as api
from undial_peft.training import loss as loss_module
from undial_peft.training.adapters import build_trainable
from undial_peft.utils.storage import atomic_directory

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("undial-peft: error: "), lines[0]
    return lines[0]


# --- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("beta", 0.0), ("beta", -1.0), ("beta", math.nan), ("beta", math.inf),
     ("learning_rate", 0.0), ("learning_rate", -1e-4), ("learning_rate", math.nan)],
)
def test_out_of_range_config_is_refused(field, value):
    with pytest.raises(UndialConfigError, match=rf"^{field}=.* is invalid: use a finite value > 0"):
        UndialConfig(**{field: value})


@pytest.mark.parametrize(
    ("targets", "message"),
    [([], "target_modules is empty"),
     (["no_such_proj"], r"LoRA config does not fit this model: Target modules \{'no_such_proj'\} not found"),
     (["lm_head"], "must not target the LM head")],
)
def test_lora_targets_that_cannot_work(tiny_dir, targets, message):
    base, _ = load_model(tiny_dir)
    with pytest.raises(UndialStackError, match=message):
        build_trainable(base, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))


def test_four_bit_without_bitsandbytes_fails_before_loading(tiny_dir, facts, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k))
    start = time.perf_counter()
    with pytest.raises(UndialModelError, match=r"^4-bit loading needs bitsandbytes: pip install bitsandbytes$"):
        api.forget(tiny_dir, facts[:4], tmp_path / "req-0", load_in_4bit=True)
    assert time.perf_counter() - start < 5 and not (tmp_path / "req-0").exists()
    data = _jsonl(tmp_path / "forget.jsonl", facts[:4])
    assert cli_main(["forget", "--model", tiny_dir, "--data", str(data), "--out", str(tmp_path / "r"), "--4bit"]) == 2
    assert _one_error_line(capsys) == "undial-peft: error: 4-bit loading needs bitsandbytes: pip install bitsandbytes"


def test_existing_output_dir_fails_fast_before_reading_or_loading(tmp_path, monkeypatch, capsys):
    out = tmp_path / "req-0"
    out.mkdir()
    (out / "keep.txt").write_text("earlier adapter")

    def must_not_run(*args, **kwargs):
        raise AssertionError("forget read data or loaded a model for an existing output directory")

    monkeypatch.setattr(api, "read_examples", must_not_run)
    monkeypatch.setattr(api, "load_model", must_not_run)
    start = time.perf_counter()
    with pytest.raises(FileExistsError, match="req-0 already exists; choose another name"):
        api.forget("no-such-model", "no-such-file.jsonl", out)
    assert time.perf_counter() - start < 0.5
    assert cli_main(["forget", "--model", "no-such-model", "--data", "x.jsonl", "--out", str(out)]) == 2
    assert _one_error_line(capsys) == (
        f"undial-peft: error: {out} already exists; choose another name or pass overwrite=True (--overwrite).")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=r"--resume: no checkpoint in .*\.req-0\.checkpoints; run again without"):
        api.forget("no-such-model", [{"text": "a b c"}], tmp_path / "req-0", resume=True)


# --- CLI user errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"question": "Where?", "answer": "Here."}\n{"question": oops}\n', [],
         "forget.jsonl line 2: invalid JSON (Expecting value)."),
        ('{"question": "Where?"}\n', [], "forget data, forget.jsonl line 1: field 'answer' is missing."),
        ("", [], "forget.jsonl: the file is empty; give at least one row."),
        ('{"text": "a b"}\n', ["--beta", "0"], "beta=0.0 is invalid: use a finite value > 0"),
    ],
    ids=["invalid-json", "missing-field", "empty", "beta-0"],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, content, args, message):
    data = tmp_path / "forget.jsonl"
    data.write_text(content, encoding="utf-8")
    argv = ["forget", "--model", "no-such-model", "--data", str(data), "--out", str(tmp_path / "req-0"), *args]
    assert cli_main(argv) == 2
    assert _one_error_line(capsys).startswith(f"undial-peft: error: {message}")
    assert not (tmp_path / "req-0").exists()


# --- numerical faults ---------------------------------------------------------------------------
def test_nan_loss_stops_training_and_writes_nothing(tiny_dir, facts, tmp_path, monkeypatch):
    for name in ("undial_loss", "undial_loss_from_hidden"):
        real = getattr(loss_module, name)
        monkeypatch.setattr(loss_module, name, lambda *a, _real=real, **k: _real(*a, **k) * math.nan)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "adapters"
    config = UndialConfig(max_steps=3, per_device_train_batch_size=2, disable_tqdm=True)
    with pytest.raises(UndialTrainingError, match=r"non-finite loss \(nan\) at step 0: .* no adapter was written"):
        api.forget(tiny_dir, facts[:4], root / "req-0", config=config)
    assert not root.exists() or sorted(p.name for p in root.iterdir()) == []  # no adapter, staging or checkpoints
    assert sorted(p.name for p in cwd.iterdir()) == []  # and no "trainer_output" in the working directory


# --- racing writers -----------------------------------------------------------------------------
def test_two_writers_of_one_adapter_name(tmp_path):
    target, parts = tmp_path / "req-0", 20
    barrier = threading.Barrier(2, timeout=60)
    outcome: dict[str, object] = {}

    def write(name: str) -> None:
        try:
            with atomic_directory(target) as staging:
                for i in range(parts):
                    (staging / f"part-{i}").write_text(name * 4096)
                barrier.wait()  # both writers are past the exists check with everything staged
            outcome[name] = "ok"
        except FileExistsError as err:
            outcome[name] = err

    writers = [threading.Thread(target=write, args=(name,)) for name in "AB"]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(60)
    winners = [name for name, result in outcome.items() if result == "ok"]
    losers = [result for result in outcome.values() if isinstance(result, FileExistsError)]
    assert len(winners) == 1 and len(losers) == 1, outcome
    assert "was created by another process" in str(losers[0])
    assert sorted(p.name for p in target.iterdir()) == sorted(f"part-{i}" for i in range(parts))
    assert {p.read_text() for p in target.iterdir()} == {winners[0] * 4096}
    assert [p.name for p in tmp_path.iterdir()] == ["req-0"]  # the loser's staging dir is gone


# --- killed run, resume, leaks --------------------------------------------------------------------
PARKED_CLI = """
import pathlib, sys, time
from transformers import Trainer
marker, park_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
train_step = Trainer.training_step
def parked(self, *args, **kwargs):
    if self.state.global_step >= park_at:  # every checkpoint up to park_at is complete
        marker.write_text(str(self.state.global_step))
        time.sleep(600)
    return train_step(self, *args, **kwargs)
Trainer.training_step = parked
from undial_peft.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def interrupted(tiny_dir, facts, tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    inputs = tmp_path_factory.mktemp("inputs")  # the forget data itself lives outside root
    needles = forget_text(facts[:8])
    run = SimpleNamespace(root=root, needles=needles)
    stack = api.forget(tiny_dir, facts[:4], root / "adapters" / "req-0", config=UndialConfig(
        max_steps=2, per_device_train_batch_size=4, disable_tqdm=True, logging_steps=100))
    run.data = _jsonl(inputs / "forget.jsonl", facts[4:8])
    args = ["--model", tiny_dir, "--data", str(run.data), "--stack", str(stack), "--max-steps", "10",
            "--save-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--seed", "3", "--quiet", "--until", "none"]
    out = root / "adapters" / "req-1"
    checkpoints = root / "adapters" / ".req-1.checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}

    # 1. the run that gets killed
    marker, log_a = inputs / "parked", inputs / "killed.log"
    with open(log_a, "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", PARKED_CLI, str(marker), "4", "-v", "forget", *args,
                                  "--out", str(out)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=inputs)
        deadline = time.monotonic() + 180
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        parked = marker.exists()
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    run.log_killed = log_a.read_bytes()
    assert parked, run.log_killed.decode(errors="replace")[-3000:]
    run.killed_returncode = child.returncode
    run.after_kill = sorted(p.name for p in (root / "adapters").iterdir())
    run.checkpoints_after_kill = sorted(p.name for p in checkpoints.iterdir())
    run.checkpoint_hits = leak_scan(checkpoints, needles)
    run.checkpoint4 = load_file(checkpoints / "checkpoint-4" / "forget_new" / WEIGHTS)
    # a kill during the next save would leave a newer checkpoint without trainer_state.json
    partial = checkpoints / "checkpoint-6"
    shutil.copytree(checkpoints / "checkpoint-4", partial)
    (partial / "trainer_state.json").unlink()
    (partial / "optimizer.pt").write_bytes((partial / "optimizer.pt").read_bytes()[:100])

    # 2. --resume, with debug logging
    resumed = subprocess.run([sys.executable, "-m", "undial_peft.cli", "-v", "forget", *args, "--out", str(out),
                              "--resume"], capture_output=True, env=env, cwd=inputs, timeout=300)
    run.resumed = resumed
    run.out, run.checkpoints = out, checkpoints

    # 3. the same command, uninterrupted, in this process
    run.reference = root / "reference" / "req-1"
    records, handler = [], logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    stdout, stderr = io.StringIO(), io.StringIO()
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run.reference_code = cli_main(["forget", *args, "--out", str(run.reference)])
    finally:
        logging.getLogger().removeHandler(handler)
    run.reference_log = (stdout.getvalue() + stderr.getvalue() + "\n".join(records)).encode()
    return run


def test_killed_run_leaves_no_adapter_directory(interrupted):
    assert interrupted.killed_returncode == -signal.SIGKILL
    assert interrupted.after_kill == [".req-1.checkpoints", "req-0"]  # no req-1, no staging dir
    assert interrupted.checkpoints_after_kill == ["checkpoint-2", "checkpoint-4"]


def test_resume_continues_from_the_last_complete_checkpoint_and_matches_an_uninterrupted_run(interrupted):
    run = interrupted
    log = run.resumed.stdout.decode() + run.resumed.stderr.decode()
    assert run.resumed.returncode == 0, log[-3000:]
    assert run.reference_code == 0
    assert not run.checkpoints.exists(), "checkpoints are removed once the adapter is saved"
    assert not (run.reference.parent / ".req-1.checkpoints").exists()
    resumed, reference = load_file(run.out / WEIGHTS), load_file(run.reference / WEIGHTS)
    assert resumed.keys() == reference.keys()
    worst = max((resumed[k] - reference[k]).abs().max().item() for k in resumed)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
    moved = max((resumed[k] - run.checkpoint4[k]).abs().max().item() for k in resumed)
    assert moved > 1e-4, "the resumed run did not train past checkpoint-4"
    assert json.loads((run.out / MANIFEST).read_text())["metrics"]["steps"] == 10
    assert "checkpoint-6 is incomplete (the run stopped while saving it); removed" in log
    assert f"resumed the new adapter from {run.checkpoints / 'checkpoint-4'}" in log
    assert log.count("'loss':") == 6, "the resumed run should train steps 5..10 only"


def test_no_forget_text_on_disk_or_in_logs(interrupted):
    run = interrupted
    assert run.needles[:2] == ["Where was Zorbel born?", "Where was Quenna born?"] and "Kavara" in run.needles
    assert leak_hits(run.data.read_bytes(), run.needles)  # the scan does find the text where it is
    assert run.checkpoint_hits == {}, "checkpoints of the killed run hold forget text"
    assert leak_scan(run.root, run.needles) == {}, "adapter directories hold forget text"
    for name, blob in (("killed run", run.log_killed), ("resumed run", run.resumed.stdout + run.resumed.stderr),
                       ("in-process run", run.reference_log)):
        assert blob.strip() and leak_hits(blob, run.needles) == [], f"{name} log holds forget text"


def test_manifest_holds_only_a_hash_of_the_data(interrupted):
    manifest = json.loads((interrupted.out / MANIFEST).read_text())
    assert manifest["data"] == {"hmac_sha256": data_digest(read_examples(interrupted.data)), "examples": 4,
                                "key_id": key_id(), "retain_hmac_sha256": None,
                                "guard_rows": 64}  # the default guard: a count of the teacher's answers, never text
    assert manifest["description"] is None
