"""`forget`'s flags come from UndialConfig's fields; --config FILE sets them too, flags win."""

from __future__ import annotations

import dataclasses

import pytest

from undial_peft.cli import build_parser
from undial_peft.errors import UndialConfigError
from undial_peft.training.config import UndialConfig
from undial_peft.training.config_flags import HIDDEN, config_fields, config_from_args


def _forget_args(*flags: str):
    return build_parser().parse_args(["forget", "--data", "f.jsonl", "--out", "o", *flags])


def test_every_own_field_of_undialconfig_has_a_flag_with_its_help_and_default():
    forget = build_parser()._subparsers._group_actions[0].choices["forget"]
    by_dest = {a.dest: a for a in forget._actions}
    own = [n for n in UndialConfig.__dict__["__annotations__"] if n not in HIDDEN]
    assert own and all(name in by_dest for name in own)
    for field in config_fields():
        action = by_dest[field.name]
        assert action.default is None  # unset flags keep the config's default, never a copy of it
        assert f"(default: {field.default})" in action.help


def test_flags_left_out_keep_undialconfig_defaults():
    config = config_from_args(_forget_args())
    defaults = UndialConfig()
    for field in config_fields():
        assert getattr(config, field.name) == getattr(defaults, field.name), field.name


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 3.0\nlearning_rate: 0.001\nmax_retain_drop: null\nauto_key: false\n", encoding="utf-8")
    config = config_from_args(_forget_args("--config", str(path), "--lr", "2e-4"))
    assert (config.beta, config.learning_rate, config.max_retain_drop, config.auto_key) == (3.0, 2e-4, None, False)
    (tmp_path / "bad.json").write_text('{"betta": 3}', encoding="utf-8")
    with pytest.raises(UndialConfigError, match=r"unknown fields \['betta'\]"):
        config_from_args(_forget_args("--config", str(tmp_path / "bad.json")))


def test_optional_fields_read_none_and_aliases_reach_their_field():
    args = _forget_args("--until-ratio", "none", "--batch-size", "2", "--grad-accum", "3", "--epochs", "2")
    config = config_from_args(args)
    assert config.until_ratio is None
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (2, 3)
    assert (config.num_train_epochs, config.max_steps) == (2.0, -1)  # fixed epochs: the step limit steps aside
    assert dataclasses.is_dataclass(config)
