"""Ollama's recipe for a GGUF LoRA export: a Modelfile naming the base and the one adapter.

>>> modelfile_path("adapters/all.gguf").as_posix()
'adapters/all.Modelfile'
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from undial_peft.utils.storage import atomic_file

logger = logging.getLogger(__name__)


def modelfile_path(adapter: str | Path) -> Path:
    """Where `export_gguf` writes the Ollama recipe for a single-file export.

    >>> modelfile_path("adapters/all.gguf").as_posix()
    'adapters/all.Modelfile'
    """
    # Named after the adapter, not plain "Modelfile": several exports may share a folder.
    return Path(adapter).with_suffix(".Modelfile")


def write_modelfile(adapter: str | Path, base: str, *, overwrite: bool = False) -> Path:
    """Write an Ollama Modelfile beside a GGUF LoRA: the base with this one adapter.

    ``base`` is what ``FROM`` names: the base GGUF file (absolute path), else the model as given.
    ``ADAPTER`` is relative, and Ollama reads it relative to the Modelfile, so the two files move
    together. Ollama applies one adapter per model, hence a single-file export only.

    >>> write_modelfile("adapters/all.gguf", "/models/gemma-3-270m-q4_k_m.gguf")  # doctest: +SKIP
    PosixPath('adapters/all.Modelfile')

    then ``ollama create forgetful -f adapters/all.Modelfile && ollama run forgetful``.
    """
    adapter = Path(adapter)
    path = modelfile_path(adapter)
    text = f"FROM {_modelfile_value(base)}\nADAPTER {_modelfile_value('./' + adapter.name)}\n"
    with atomic_file(path, overwrite=overwrite) as temporary:
        temporary.write_text(text, encoding="utf-8")
    logger.info("wrote %s (ollama create NAME -f %s)", path, path)
    return path


def _modelfile_value(value: str) -> str:
    # Ollama's Modelfile parser reads a quoted value as one argument; quote paths with spaces.
    return json.dumps(value) if any(c.isspace() for c in value) else value
