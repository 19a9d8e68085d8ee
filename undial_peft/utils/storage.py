"""Atomic writes: a directory or file is either complete or absent, never half-written.

>>> with atomic_directory("adapters/req-001") as staging:  # doctest: +SKIP
...     (staging / "undial.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from undial_peft.errors import OutputExistsError


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(target: Path, overwrite: bool) -> None:
    """The one "already exists" error of every writer."""
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another name or pass overwrite=True (--overwrite).")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that becomes ``target`` only on success.

    On error the temporary directory is removed and ``target`` is untouched. Two writers racing
    for one name: the second rename fails (the target is no longer empty) and that writer gets
    an error; the first writer's directory is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_existing(target, overwrite)
    temporary = _temporary(target, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        for path in temporary.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if target.exists() and overwrite:
            old = _temporary(target, "old")
            target.rename(old)
        try:
            temporary.rename(target)
        except OSError as err:
            if old is not None:
                old.rename(target)
            raise OutputExistsError(f"{target} was created by another process while this one ran; nothing was replaced.") from err
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_existing(target, overwrite)
    temporary = _temporary(target, "tmp")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_dir(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict[str, Any], *, atomic: bool = False) -> None:
    """Pretty, sorted JSON with a final newline (in one rename with ``atomic``)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if not atomic:
        Path(path).write_text(text, encoding="utf-8")
        return
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
