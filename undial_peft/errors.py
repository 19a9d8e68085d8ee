"""The library's own errors: one root, `UndialError`, and one subclass per kind of fix.

Each message names the problem and the fix. The CLI prints these as one line (exit 2); any other
exception is a bug and keeps its traceback. Each subclass is also the builtin type a caller would
expect (a bad value is a ``ValueError``), so ``except ValueError`` keeps working.

>>> try:
...     raise UndialDataError("forget data, f.jsonl line 3: field 'answer' is missing.")
... except UndialError as err:
...     print(type(err).__name__, isinstance(err, ValueError))
UndialDataError True
"""

from __future__ import annotations


class UndialError(Exception):
    """Root of every error the library raises on purpose."""


class UndialConfigError(UndialError, ValueError):
    """A setting, flag or combination of them is invalid; the message names the field and the fix."""


class UndialDataError(UndialError, ValueError):
    """Bad forget, retain or evaluation data (or data name); the message names the row, never its text."""


class UndialModelError(UndialError, ValueError):
    """The base model cannot be loaded or used as asked."""


class UndialStackError(UndialError, ValueError):
    """An adapter directory, LoRA config or stack fails a check; ``force=True`` skips the soft ones."""


class UndialExportError(UndialError, ValueError):
    """An adapter or stack cannot be exported in the asked form (GGUF, vLLM, merge)."""


class UndialTrainingError(UndialError, RuntimeError):
    """Training cannot go on (e.g. nothing is trainable, or the loss is not finite)."""


class OutputExistsError(UndialError, FileExistsError):
    """The output path exists; choose another name or overwrite."""


__all__ = ["OutputExistsError", "UndialConfigError", "UndialDataError", "UndialError", "UndialExportError",
           "UndialModelError", "UndialStackError", "UndialTrainingError"]
