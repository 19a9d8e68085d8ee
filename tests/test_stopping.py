"""Stop when forgotten: the target, the retain budget (with roll-back), a missed target, and the
key probability it measures, checked against an independent float64 computation."""

from __future__ import annotations

import contextlib
import json
import logging
import math

import numpy as np
import pytest
import torch
from transformers import TrainerControl, TrainerState

from undial_peft import UndialConfig
from undial_peft.data.encoding import encode
from undial_peft.data.readers import Example
from undial_peft.deploy.manifest import MANIFEST
from undial_peft.deploy.stack import attach
from undial_peft.errors import UndialTrainingError
from undial_peft.evals.report import score
from undial_peft.models import load_model
from undial_peft.training import forget as api
from undial_peft.training import stopping
from undial_peft.training.stopping import StopWhenForgotten, describe_outcome, key_probabilities


def _config(**overrides) -> UndialConfig:
    settings = {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "disable_tqdm": True, "logging_steps": 100,
                "auto_key": False, "check_every": 1, "min_steps": 0}
    return UndialConfig(**{**settings, **overrides})


def _manifest(path) -> dict:
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))


def _probability(tiny_dir, adapter, rows) -> float:
    """Mean answer probability of ``rows`` with ``adapter`` attached, measured independently (evaluate.score)."""
    model, tokenizer = load_model(tiny_dir)
    model = attach(model, [adapter], tokenizer=tokenizer)
    scores = score(model, tokenizer, [Example(r["question"], r["answer"]) for r in rows])
    return float(np.mean([math.exp(s.logprobs.mean()) for s in scores]))


def test_key_probability_matches_float64_reference(tiny_dir, facts):
    model, tokenizer = load_model(tiny_dir)
    keyed = [Example(f["question"], f["answer"], f["answer"].split()[-1].rstrip(".")) for f in facts[:3]]
    rows = [encode(tokenizer, e, 64) for e in keyed]
    got = key_probabilities(model, rows, tokenizer.pad_token_id, batch_size=2)
    for example, row, value in zip(keyed, rows, got.tolist()):
        logprobs = score(model.double(), tokenizer, [example])[0].logprobs  # answer tokens, float64
        on_key = np.array(row["beta_weight"])[-len(logprobs):] > 0  # the city's token only
        assert on_key.sum() == 1
        assert value == pytest.approx(math.exp(logprobs[on_key].mean()), rel=1e-4)
        model.float()


def test_stops_at_the_target(tiny_dir, facts, tmp_path):
    out = api.forget(tiny_dir, facts[:4], tmp_path / "a", config=_config(until_ratio=0.5, max_steps=200, check_every=2))
    stop = _manifest(out)["stopping"]
    assert stop["stopped"] == "target"
    assert stop["step"] < 200 and stop["step"] % 2 == 0
    assert stop["forget_after"] <= 0.5 * stop["forget_before"] == pytest.approx(stop["target"])
    assert stop["history"][-2]["forget"] > stop["target"]  # it stopped at the FIRST check below the target
    assert _probability(tiny_dir, out, facts[:4]) < 0.5 * stop["forget_before"]  # the saved adapter (no key: all tokens)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"stopped at step {stop['step']}: target reached" in card


def test_min_steps_holds_the_target_back(tiny_dir, facts, tmp_path):
    early = _manifest(api.forget(tiny_dir, facts[:4], tmp_path / "a", config=_config(until_ratio=0.5, max_steps=200)))
    first = early["stopping"]["step"]  # the first check below the target
    late = _manifest(api.forget(tiny_dir, facts[:4], tmp_path / "b",
                                config=_config(until_ratio=0.5, max_steps=200, min_steps=first + 3)))["stopping"]
    # Held back: the target was reached at step `first`, so the first check, at min_steps, stops it.
    assert late["stopped"] == "target" and late["step"] == first + 3
    assert late["history"][-1]["forget"] <= late["target"]
    assert [p["step"] for p in late["history"]] == [0, first + 3]  # no check before min_steps: none could stop
    # A step limit below min_steps: the target was reached, and the outcome says so.
    capped = _manifest(api.forget(tiny_dir, facts[:4], tmp_path / "c",
                                  config=_config(until_ratio=0.5, max_steps=first + 2, min_steps=first + 10)))["stopping"]
    assert capped["step"] == first + 2 and capped["forget_after"] <= capped["target"]
    assert capped["stopped"] == "target"


def test_stops_on_the_retain_budget_and_rolls_back(tiny_dir, facts, tmp_path):
    # Facts share one template, so forgetting 0..3 drags 12..15 down: the budget must stop it.
    config = _config(until_ratio=0.01, max_retain_drop=0.05, max_steps=200)
    out = api.forget(tiny_dir, facts[:4], tmp_path / "a", retain=facts[12:], config=config)
    stop = _manifest(out)["stopping"]
    assert stop["stopped"] == "retain_budget"
    assert stop["exceeded_at_step"] == stop["step"] + 1  # checked every step; the step before was within budget
    assert stop["forget_after"] > stop["target"]  # the trade-off: the target was not reached
    kept = _probability(tiny_dir, out, facts[12:])
    assert kept == pytest.approx(stop["retain_after"], rel=1e-3)  # the saved adapter is the rolled-back one
    assert kept >= stop["retain_floor"] == pytest.approx(0.95 * stop["retain_before"])


def test_reports_a_missed_target(tiny_dir, facts, tmp_path, caplog):
    config = _config(until_ratio=0.01, max_steps=3, learning_rate=1e-4)
    with caplog.at_level(logging.INFO):
        out = api.forget(tiny_dir, facts[:4], tmp_path / "a", config=config)
    stop = _manifest(out)["stopping"]
    assert stop["stopped"] == "max_steps" and stop["step"] == 3
    missed = stop["forget_after"] - stop["target"]
    assert missed > 0
    assert f"missed by {missed:.4f}" in caplog.text
    assert "step limit reached before the target" in (out / "README.md").read_text(encoding="utf-8")


def test_fixed_length_without_a_target(tiny_dir, facts, tmp_path):
    out = api.forget(tiny_dir, facts[:4], tmp_path / "a", config=_config(until_ratio=None, max_steps=3))
    manifest = _manifest(out)
    assert manifest["stopping"] == {"stopped": "fixed_length"} and manifest["metrics"]["steps"] == 3


def test_describe_says_why():
    text = describe_outcome({"stopped": "max_steps", "step": 100, "forget_before": 0.8, "forget_after": 0.4, "target": 0.16,
                     "retain_before": 0.9, "retain_after": 0.85})
    assert text == ("stopped at step 100: step limit reached before the target; forget key probability 0.800 -> 0.400 "
                    "(0.50x; target 0.160); retain probability 0.900 -> 0.850")
    silence = {"asked": 6, "before": 6, "at_target": 2, "after": 1, "rounds": 3, "steps": 30}
    text = describe_outcome({"stopped": "target", "step": 45, "forget_before": 0.8, "forget_after": 0.1, "target": 0.16,
                             "silence": silence})
    assert text.endswith("; greedy answers saying their key 6 -> 2 at the target -> 1 of 6 (3 silence rounds)")
    assert "greedy" not in describe_outcome({"stopped": "target", "step": 5, "forget_before": 0.8, "forget_after": 0.1,
                                             "target": 0.16, "silence": {**silence, "asked": 0}})


def test_key_probability_restores_train_mode(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    model.train()
    key_probabilities(model, [encode(tokenizer, Example("Where was Zorbel born?", "Zorbel was born in Kavara."), 64)],
                      tokenizer.pad_token_id)
    assert model.training and all(p.grad is None for p in model.parameters())


class _Resumed:
    """A one-weight model whose forget / retain figures are set by hand: ``w`` 1.0 is the checkpoint's
    weight, 2.0 a step that breaks the retain budget; with the new adapter off (before) 0.8 / 0.9."""

    FIGURES = {"off": (0.8, 0.9), 1.0: (0.5, 0.88), 2.0: (0.3, 0.7)}  # (forget, retain); floor 0.9 x 0.9 = 0.81

    def __init__(self, monkeypatch, resumed_weight: float = 1.0) -> None:
        self.model = torch.nn.Linear(1, 1, bias=False)
        self.model.weight.data.fill_(resumed_weight)
        self.model.off = False

        @contextlib.contextmanager
        def adapter_off(model, active):
            model.off = True
            try:
                yield
            finally:
                model.off = False

        def figures(model, rows, pad_token_id, batch_size=16):
            forget, retain = self.FIGURES["off" if model.off else model.weight.item()]
            return torch.full((len(rows),), forget if "beta_weight" in rows[0] else retain)

        monkeypatch.setattr(stopping, "adapter_state", adapter_off)
        monkeypatch.setattr(stopping, "key_probabilities", figures)
        rows = [{"input_ids": [1, 2], "labels": [1, 2], "beta_weight": [1.0, 1.0]}]
        self.stop = StopWhenForgotten(rows, 0, until_ratio=0.2, retain_rows=rows, max_retain_drop=0.1, teacher_adapters=[])
        self.state, self.control = TrainerState(global_step=4, max_steps=10), TrainerControl()


def test_resume_then_roll_back_reports_the_weights_it_keeps(monkeypatch):
    run = _Resumed(monkeypatch)
    run.stop.on_train_begin(None, run.state, run.control, model=run.model)  # resumed at step 4, w = 1
    run.model.weight.data.fill_(2.0)  # step 5 breaks the retain budget (0.7 < 0.81)
    run.state.global_step = 5
    run.stop.on_step_end(None, run.state, run.control, model=run.model)
    run.stop.on_train_end(None, run.state, run.control, model=run.model)
    out = run.stop.outcome
    assert run.control.should_training_stop and out["stopped"] == "retain_budget" and out["exceeded_at_step"] == 5
    assert run.model.weight.item() == 1.0  # rolled back to the resumed weights...
    assert (out["forget_after"], out["retain_after"], out["step"]) == (0.5, pytest.approx(0.88), 4)  # ...and their figures
    assert (out["forget_before"], out["retain_before"]) == pytest.approx((0.8, 0.9))  # before: the new adapter off
    assert [p["step"] for p in run.stop.history] == [0, 4, 5, 4]
    assert "forget key probability 0.800 -> 0.500 (0.62x" in describe_outcome(out)


def test_resume_past_the_retain_budget_is_an_error(monkeypatch):
    run = _Resumed(monkeypatch, resumed_weight=2.0)  # the checkpoint itself is below the floor
    with pytest.raises(UndialTrainingError, match="checkpoint at step 4 already loses more of the retain set"):
        run.stop.on_train_begin(None, run.state, run.control, model=run.model)


def test_the_retain_watch_spreads_over_the_whole_set():
    rows = [{"input_ids": [i, 1], "labels": [i, 1]} for i in range(200)]
    stop = StopWhenForgotten(rows[:1], 0, retain_rows=rows, max_retain_drop=0.1, max_retain_rows=64)
    watched = [r["input_ids"][0] for r in stop.retain_rows]
    # Evenly spaced, by hand: row i * 200 // 64 for i = 0..63, i.e. 0, 3, 6, 9, 12, 15, 18, 21, 25, ... 196.
    assert watched == [i * 200 // 64 for i in range(64)] and watched[:9] == [0, 3, 6, 9, 12, 15, 18, 21, 25]
    assert max(watched) == 196  # rows past the first 64 are watched
    assert len(StopWhenForgotten(rows[:1], 0, retain_rows=rows[:10], max_retain_drop=0.1).retain_rows) == 10  # all


def test_max_retain_rows_reaches_the_watch_from_the_config_and_the_cli(tiny_dir, facts):
    from undial_peft.cli import _forget_config, build_parser

    args = build_parser().parse_args(["forget", "--data", "f.jsonl", "--out", "a", "--max-retain-rows", "3"])
    config = _config(max_retain_rows=_forget_config(args).max_retain_rows)
    assert config.max_retain_rows == 3 and UndialConfig().max_retain_rows == 16
    _, tokenizer = load_model(tiny_dir)
    retain = [Example(f["question"], f["answer"]) for f in facts[4:16]]  # 12 rows
    forget_features = api._encoded(tokenizer, [Example(facts[0]["question"], facts[0]["answer"])], config)
    stop = api._stopper(tokenizer, forget_features, retain, config, [])
    expected = [encode(tokenizer, retain[i], config.max_length)["input_ids"] for i in (0, 4, 8)]
    assert [r["input_ids"] for r in stop.retain_rows] == expected
    with pytest.raises(ValueError, match="max_retain_rows=0 is invalid"):
        _config(max_retain_rows=0)
