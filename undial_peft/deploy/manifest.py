"""Adapter directories: the ``undial.json`` manifest (`Manifest`, its only reader and writer) and checks.

An adapter directory holds peft's ``adapter_model.safetensors`` and ``adapter_config.json``, our
``undial.json`` and a model card ``README.md``. The manifest names the base model's fingerprint,
the ordered parent stack (ids and weight hashes), the prompt format, and a keyed hash of the data,
never the data. Its fields are documented in docs/stacks.md.

>>> manifest = Manifest.from_pretrained("adapters/req-001")  # doctest: +SKIP
>>> manifest.parents  # doctest: +SKIP
[{'id': 'req-000', 'sha256': '9c1e...'}]
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from undial_peft.errors import UndialStackError
from undial_peft.models import PACKAGED
from undial_peft.utils.storage import atomic_directory, file_sha256, write_json
from undial_peft.utils.versions import versions

logger = logging.getLogger(__name__)

MANIFEST, WEIGHTS, CONFIG = "undial.json", "adapter_model.safetensors", "adapter_config.json"
FORMAT = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """What ``undial.json`` records about one adapter directory (never the data it forgets).

    >>> m = Manifest(id="req-001", method="undial", base={"fingerprint": "ab" * 32}, versions={})
    >>> m.to_dict()["parents"], Manifest.from_dict(m.to_dict()) == m
    ([], True)
    """

    id: str  # the directory's name when it was written
    method: str  # undial / ga / graddiff / npo; "export" for a stack exported as one adapter
    base: dict[str, Any]  # models.base_identity of the base (fingerprint, linear sample) and its source name
    parents: list[dict[str, str]] = field(default_factory=list)  # the stack it was trained on: [{id, sha256}]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # keyed digests and counts, never text
    prompt_format: dict[str, Any] | None = None  # data.prompt_format.PromptFormat.to_dict()
    metrics: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, int] | None = None  # how rows chose their adjusted tokens: counts only
    stopping: dict[str, Any] | None = None  # why training stopped, the checks' history
    deployed: dict[str, Any] | None = None  # the forget set measured on the model as served
    stack: list[dict[str, str]] | None = None  # export only: the adapters it sums
    serving: dict[str, Any] | None = None  # export only: vLLM rank, rank budget, energy kept
    description: str | None = None  # what was forgotten, in the operator's words
    versions: dict[str, str] = field(default_factory=versions)
    created: str = field(default_factory=_now)
    weights_sha256: str | None = None  # set on save: sha256 of adapter_model.safetensors
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (every field; null where it does not apply)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST) -> Manifest:
        """Parse a JSON object; names the missing or unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("id", "method", "base") if name not in data]
        unknown = sorted(set(data) - names)
        if missing or unknown or data.get("format", FORMAT) > FORMAT:
            problem = (f"fields {missing} are missing" if missing else f"unknown fields {unknown}" if unknown
                       else f"format {data['format']} is newer than this version reads ({FORMAT})")
            raise UndialStackError(f"{where}: {problem}; upgrade undial_peft or restore the file from a backup.")
        return cls(**data)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``undial.json`` into ``directory`` (inside an atomic staging directory)."""
        path = Path(directory) / MANIFEST
        write_json(path, self.to_dict())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Manifest | None:
        """The manifest of an adapter directory, or None for a plain peft adapter."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UndialStackError(f"{path}: not valid JSON ({err.msg}); restore it from a backup.") from None
        return cls.from_dict(data, str(path))


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """`Manifest.from_pretrained` as a plain dict (None for a plain peft adapter)."""
    manifest = Manifest.from_pretrained(directory)
    return None if manifest is None else manifest.to_dict()


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


def recorded_prompt_format(stack: Sequence[str | Path]) -> dict[str, Any] | None:
    """The prompt format the stack's manifests record (None where none records one), so that eval
    asks the way the adapters were trained and verified; adapters that disagree are an error."""
    formats = {json.dumps(m.prompt_format, sort_keys=True) for d in stack
               if (m := Manifest.from_pretrained(d)) is not None and m.prompt_format is not None}
    if len(formats) > 1:
        raise UndialStackError(f"the stack's adapters were trained in different prompt formats ({sorted(formats)}); "
                               "pass the one to measure with --prompt-format.")
    return json.loads(formats.pop()) if formats else None


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
    if source not in PACKAGED and not Path(source).exists():  # "default", "gemma3-270m": packaged aliases
        raise UndialStackError(f"the stack's recorded base {source!r} is not on this machine; pass the base with --model.")
    return source


def save_adapter(
    model: Any,
    adapter: str,
    output_dir: str | Path,
    manifest: Manifest | None = None,
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
            manifest.weights_sha256 = file_sha256(staging / WEIGHTS)
            manifest.save_pretrained(staging)
            (staging / "README.md").write_text(model_card(manifest.to_dict()), encoding="utf-8")
        for name, data in (extra_json or {}).items():
            write_json(staging / name, data)
    return Path(output_dir)
