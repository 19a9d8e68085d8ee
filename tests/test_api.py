"""The public API: every name in ``undial_peft.__all__`` is the object its docs name, and the CLI
prints the library's own errors as one line while any other exception keeps its traceback."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types

import pytest

import undial_peft
from undial_peft import cli
from undial_peft.errors import UndialDataError, UndialError


def test_all_lists_exactly_the_lazy_names():
    assert set(undial_peft.__all__) == {"__version__", *undial_peft._API}


@pytest.mark.parametrize("name", [n for n in undial_peft.__all__ if n != "__version__"])
def test_every_public_name_is_the_documented_object_not_a_module(name):
    value = getattr(undial_peft, name)
    assert not isinstance(value, types.ModuleType), f"undial_peft.{name} is a module"
    assert inspect.isclass(value) or inspect.isfunction(value)
    assert value.__name__ == name and value.__module__ == undial_peft._API[name]
    assert value.__doc__, f"undial_peft.{name} has no docstring"


def test_api_names_survive_importing_their_modules_first():
    # Importing a submodule binds it as an attribute of its package; the function must still win
    # (before, `from undial_peft import evaluate` returned the module undial_peft.evaluate).
    code = ("import undial_peft.evals.report, undial_peft.training.forget, undial_peft.deploy.stack\n"
            "from undial_peft import evaluate, forget, attach\n"
            "print(all(callable(f) and not hasattr(f, '__path__') and type(f).__name__ == 'function'"
            " for f in (evaluate, forget, attach)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_every_library_error_shares_one_root():
    from undial_peft import errors

    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, Exception)]
    assert len(classes) >= 7 and all(issubclass(c, UndialError) for c in classes)


def test_cli_prints_library_errors_as_one_line(monkeypatch, capsys):
    def broken(args):
        raise UndialDataError("forget data, f.jsonl line 3: field 'answer' is missing.")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_run(parser(), broken))
    assert cli.main(["forget", "--data", "x.jsonl", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "undial-peft: error: forget data, f.jsonl line 3: field 'answer' is missing."


@pytest.mark.parametrize("flags", [[], ["-v"]])
def test_cli_keeps_the_traceback_of_a_bug(monkeypatch, flags):
    def buggy(args):
        raise ValueError("a bug, not a user error")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_run(parser(), buggy))
    with pytest.raises(ValueError, match="a bug"):
        cli.main([*flags, "forget", "--data", "x.jsonl", "--out", "o"])


def _with_run(parser, run):
    """The real parser with the forget verb's action replaced by ``run``."""
    for action in parser._subparsers._group_actions:
        action.choices["forget"].set_defaults(run=run)
    return parser
