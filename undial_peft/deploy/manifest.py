"""Adapter directories: the ``undial.json`` manifest, hashes, checks, and atomic writes.

An adapter directory holds peft's ``adapter_model.safetensors`` and ``adapter_config.json``, our
``undial.json`` and a model card ``README.md``. The manifest names the base model's fingerprint,
the ordered parent stack (ids and weight hashes) and a sha256 of the data, never the data.

>>> manifest = read_manifest("adapters/req-001")  # doctest: +SKIP
>>> manifest["parents"]  # doctest: +SKIP
[{'id': 'req-000', 'sha256': '9c1e...'}]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from undial_peft.errors import OutputExistsError, UndialStackError

logger = logging.getLogger(__name__)

MANIFEST, WEIGHTS, CONFIG = "undial.json", "adapter_model.safetensors", "adapter_config.json"
FORMAT = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(directory: str | Path) -> None:
    """Hard checks (never skipped): the directory holds a readable safetensors adapter and no pickle."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UndialStackError(f"{directory}: no such adapter directory.")
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UndialStackError(
            f"{directory}: pickle files {pickles} are refused (they can run code when loaded); "
            "convert the adapter to adapter_model.safetensors."
        )
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise UndialStackError(f"{directory}: {name} is missing; this is not a complete LoRA adapter directory.")
    _check_safetensors(directory / WEIGHTS)


def _check_safetensors(path: Path) -> None:
    """The header parses and the file is exactly as long as the header says (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_len = struct.unpack("<Q", handle.read(8))[0]
            if header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        with safe_open(path, framework="pt"):
            pass
    except Exception as err:  # struct, json and safetensors raise several types for damaged files
        raise UndialStackError(f"{path}: unreadable ({err}); restore it from a backup.") from None
    if 8 + header_len + end != size:
        raise UndialStackError(f"{path}: truncated or padded ({size} bytes, header says {8 + header_len + end}).")


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of an adapter directory, or None for a plain peft adapter."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UndialStackError(f"{path}: not valid JSON ({err.msg}); restore it from a backup.") from None


def parent_entry(directory: str | Path) -> dict[str, str]:
    """How a child manifest names one parent adapter: its id and weight hash."""
    manifest = read_manifest(directory) or {}
    return {"id": manifest.get("id", Path(directory).name), "sha256": file_sha256(Path(directory) / WEIGHTS)}


def _base_problem(recorded: dict[str, Any], base: dict[str, Any]) -> str | None:
    """Why the recorded base differs from ``base`` (both as `models.base_identity` gives them), or None."""
    if recorded.get("fingerprint") != base.get("fingerprint"):
        return "it was trained on a different base model (fingerprint differs)"
    mine, theirs = recorded.get("linear_sample"), base.get("linear_sample")
    # Comparable only when the same layers were sampled (a 4-bit load skips its quantised layers).
    if mine and theirs and mine["layers"] == theirs["layers"] and mine["sha256"] != theirs["sha256"]:
        return "the base's linear weights differ from those it was trained on (a merged or fine-tuned copy?)"
    return None


def verify_stack(
    stack: Sequence[str | Path], base: str | dict[str, Any] | None, force: bool = False
) -> list[dict[str, Any]]:
    """Check an ordered stack before use; returns each adapter's parent entry.

    ``base`` is `models.base_identity` of the model the stack goes on (a bare fingerprint string
    also works; None skips the base check). Hard (always): files present, safetensors readable,
    no pickle. Soft (skipped with ``force``, logged instead): weight hash equals the manifest's,
    base fingerprint and linear-weight sample match, and each manifest's parents are exactly the
    adapters before it. A plain peft adapter without a manifest is allowed with a warning:
    nothing about it can be verified.
    """
    identity = {"fingerprint": base} if isinstance(base, str) else base
    entries: list[dict[str, Any]] = []
    for position, directory in enumerate(stack):
        check_files(directory)
        entry = parent_entry(directory)
        manifest = read_manifest(directory)
        problems: list[str] = []
        if manifest is None:
            logger.warning("%s has no %s: a plain peft adapter, attached unverified", directory, MANIFEST)
        else:
            if manifest.get("weights_sha256") != entry["sha256"]:
                problems.append(f"{WEIGHTS} does not match the sha256 in {MANIFEST} (tampered or replaced)")
            if identity is not None and (problem := _base_problem(manifest.get("base", {}), identity)):
                problems.append(problem)
            parents = [{"id": p["id"], "sha256": p["sha256"]} for p in manifest.get("parents", [])]
            if parents != entries[:position]:
                expected = [p["id"] for p in parents] or "no parent"
                problems.append(f"its parents are {expected}, but it sits after {[e['id'] for e in entries] or 'nothing'}")
        for problem in problems:
            message = f"{directory}: {problem}."
            if not force:
                raise UndialStackError(message + " Fix the stack order or files, or pass force=True (--force) to override.")
            logger.warning("%s (forced)", message)
        entries.append(entry)
    return entries


def recorded_base(stack: Sequence[str | Path]) -> str:
    """The base model the stack's manifests name (``base.source``), for commands run without ``--model``.

    >>> recorded_base(["adapters/req-000", "adapters/req-001"])  # doctest: +SKIP
    'default'
    """
    sources = {(read_manifest(directory) or {}).get("base", {}).get("source") for directory in stack}
    if len(sources) != 1 or None in sources:
        named = sorted(str(s) for s in sources)
        raise UndialStackError(
            f"the stack's manifests do not name one base model (found {named}: adapters trained on a loaded model "
            "or plain peft adapters record none); pass the base with --model."
        )
    source = sources.pop()
    if source != "default" and not Path(source).exists():
        raise UndialStackError(f"the stack's recorded base {source!r} is not on this machine; pass the base with --model.")
    return source


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that becomes ``target`` only on success.

    On error the temporary directory is removed and ``target`` is untouched. Two writers racing
    for one name: the second rename fails (the target is no longer empty) and that writer gets
    an error; the first writer's directory is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another name or pass overwrite=True (--overwrite).")
    temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield temporary
        for path in temporary.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if target.exists() and overwrite:
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty, sorted JSON with a final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(
    model: Any,
    adapter: str,
    output_dir: str | Path,
    manifest: dict[str, Any] | None = None,
    extra_json: dict[str, dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one adapter of a PEFT ``model`` atomically, with its manifest, model card and extra JSON files."""
    from undial_peft.deploy.card import model_card

    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        # save_embedding_layers=False: we never resize the vocabulary, and peft's "auto" would look the
        # base up on the hub (a portable name such as the hub id) to check, which offline only warns or hangs.
        model.save_pretrained(str(staging), selected_adapters=[adapter], safe_serialization=True,
                              save_embedding_layers=False)
        saved = staging / adapter  # peft writes a non-default adapter into a sub-folder named after it
        for name in (WEIGHTS, CONFIG):
            (saved / name).rename(staging / name)
        shutil.rmtree(saved)
        if manifest is not None:
            manifest["weights_sha256"] = file_sha256(staging / WEIGHTS)
            write_json(staging / MANIFEST, manifest)
            (staging / "README.md").write_text(model_card(manifest), encoding="utf-8")
        for name, data in (extra_json or {}).items():
            write_json(staging / name, data)
    return Path(output_dir)
