"""`forget`'s command-line flags, generated from `UndialConfig`'s fields: one source of names, defaults and help.

Every field UndialConfig declares becomes ``--field-name`` (plus a few TrainingArguments fields a
forget request uses, and short aliases such as ``--lr``). A flag left out keeps the value of
``--config FILE`` (YAML or JSON, field names as keys) or, failing that, the field's default.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_config_flags(parser)
>>> config = config_from_args(parser.parse_args(["--beta", "3", "--until-ratio", "none", "--no-auto-key"]))
>>> config.beta, config.until_ratio, config.auto_key, config.learning_rate
(3.0, None, False, 0.0003)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from undial_peft.errors import UndialConfigError
from undial_peft.training.config import UndialConfig

# TrainingArguments fields a forget request sets, beside UndialConfig's own.
TRAINING_FIELDS = ("gradient_accumulation_steps", "seed")
# Plumbing fields UndialConfig overrides that a user has no reason to set from the command line.
HIDDEN = {"logging_steps", "save_strategy", "remove_unused_columns", "report_to", "ddp_find_unused_parameters"}
NONE = type("ExplicitNone", (), {"__repr__": lambda self: "none"})()  # `--flag none`: unlike a flag left out
ALIASES = {"learning_rate": "--lr", "num_train_epochs": "--epochs", "per_device_train_batch_size": "--batch-size",
           "gradient_accumulation_steps": "--grad-accum"}


def config_fields() -> list[dataclasses.Field]:
    """The UndialConfig fields that have a flag, in declaration order."""
    own = list(UndialConfig.__dict__["__annotations__"])
    by_name = {f.name: f for f in dataclasses.fields(UndialConfig)}
    return [by_name[name] for name in (*own, *TRAINING_FIELDS) if name not in HIDDEN]


def _value_type(field: dataclasses.Field) -> Any:
    """A converter from the flag's text to the field's type; ``none`` reads as None where the field allows it."""
    # UndialConfig's annotations are strings ("float | None"); inherited TrainingArguments ones are types.
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    base = {"int": int, "float": float}.get(annotation.split("|")[0].strip(), str)
    if "None" not in annotation:
        return base

    def optional(text: str) -> Any:
        return NONE if text.strip().lower() == "none" else base(text)

    optional.__name__ = base.__name__  # argparse names the type in its error message
    return optional


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one flag per `config_fields` field (dest = the field's name, default unset)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="UndialConfig fields as YAML or JSON (flags given here override them)")
    for field in config_fields():
        names = [f"--{field.name.replace('_', '-')}", *([ALIASES[field.name]] if field.name in ALIASES else [])]
        text = f"{field.metadata.get('help', '')} (default: {field.default})".replace("%", "%%")
        if field.type in ("bool", bool):
            parser.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(*names, dest=field.name, type=_value_type(field), default=None,
                                metavar=field.name.upper(), help=text)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """UndialConfig fields from a YAML or JSON file; unknown keys are named."""
    path = Path(path)
    if not path.is_file():
        raise UndialConfigError(f"--config {path}: no such file.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml  # a dependency of transformers

            values = yaml.safe_load(text)
    except ValueError as err:  # json and yaml errors are ValueErrors' kin; name the file, not the text
        raise UndialConfigError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err}).") from None
    if not isinstance(values, dict):
        raise UndialConfigError(f"--config {path}: expected a mapping of UndialConfig field names to values.")
    known = {f.name for f in dataclasses.fields(UndialConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UndialConfigError(f"--config {path}: unknown fields {unknown}; use UndialConfig's field names.")
    return values


def config_from_args(args: argparse.Namespace, **extra: Any) -> UndialConfig:
    """The UndialConfig of the parsed flags: ``--config FILE`` first, then every flag given, then ``extra``."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}
    values.update({name: None if value is NONE else value for name, value in given.items()})
    if getattr(args, "num_train_epochs", None) is not None and getattr(args, "max_steps", None) is None:
        values["max_steps"] = -1  # fixed epochs asked: the default step limit steps aside
    values.update(extra)
    return UndialConfig(**values)
