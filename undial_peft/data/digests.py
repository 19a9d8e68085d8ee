"""The operator's key for data digests: manifests and reports name data by a keyed hash.

What the digests are for: checking that an evaluation report and its reference were computed on
the same data, and telling which request an adapter was trained on (stack provenance). Both are
checks by whoever holds the data, i.e. the operator. A plain sha256 would also let anyone who
holds an adapter confirm a guess ("was the request 'The capital of France is Paris.'?") by
hashing the guess; with HMAC-SHA256 under a key the operator keeps, that needs the key.

The key, first found wins:
- ``UNDIAL_PEFT_DATA_KEY``: the key itself (use a long random string);
- ``UNDIAL_PEFT_DATA_KEY_FILE``: a file holding it (surrounding whitespace is ignored);
- ``$XDG_CONFIG_HOME/undial-peft/data.key`` (default ``~/.config/...``), created on first use
  with 32 random bytes, readable by its owner only.
Either way a key must have at least 16 bytes (`check_key`). Share the key between machines that must compare digests; keep it out of adapter directories.

>>> digest = keyed_sha256([b"row 1", b"row 2"])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from undial_peft.data.readers import Example
from undial_peft.errors import UndialConfigError

KEY_ENV, KEY_FILE_ENV = "UNDIAL_PEFT_DATA_KEY", "UNDIAL_PEFT_DATA_KEY_FILE"
MIN_KEY_BYTES = 16  # a short key can be guessed along with the data, which is what the key prevents
GENERATE_KEY = "python -c 'import secrets; print(secrets.token_hex(32))'"  # what the default key file holds


def default_key_path() -> Path:
    """Where the key is kept when no environment variable names it."""
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "undial-peft" / "data.key"


def data_key() -> bytes:
    """The operator's key (see the module docstring); creates the default key file on first use."""
    if os.environ.get(KEY_ENV):
        return check_key(os.environ[KEY_ENV].encode("utf-8"), KEY_ENV)
    path = Path(os.environ.get(KEY_FILE_ENV) or default_key_path())
    if not path.is_file():
        if os.environ.get(KEY_FILE_ENV):
            raise UndialConfigError(f"{KEY_FILE_ENV}={path}: no such key file; create it or unset the variable.")
        _create_key(path)
    return check_key(path.read_bytes().strip(), str(path))


def check_key(key: bytes, source: str) -> bytes:
    """``key`` if it is long enough to be a data key, else an UndialConfigError naming ``source`` (the
    variable or file it came from) and how to generate one. One rule for every source, so that a
    key does not pass from the environment that a key file would be refused for."""
    if len(key) < MIN_KEY_BYTES:
        raise UndialConfigError(f"{source}: the data key has {len(key)} bytes, it needs at least {MIN_KEY_BYTES}; "
                         f"generate one with {GENERATE_KEY}")
    return key


def _create_key(path: Path) -> None:
    """Write a random key atomically (temporary file + link), owner-readable only; a racing writer wins cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        try:
            os.link(temporary, path)  # fails if another process created the key first: keep theirs
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def keyed_sha256(chunks: Iterable[bytes]) -> str:
    """HMAC-SHA256 of the concatenated ``chunks`` under `data_key`, as hex."""
    mac = hmac.new(data_key(), digestmod=hashlib.sha256)
    for chunk in chunks:
        mac.update(chunk)
    return mac.hexdigest()


def key_id() -> str:
    """A short name of the key, so a digest mismatch can say "other key" rather than "other data"."""
    return keyed_sha256([b"undial-peft key id"])[:16]


def data_digest(examples: Sequence[Example]) -> str:
    """A keyed digest of the rows (HMAC-SHA256 under the operator's key, see `data_key`): names the
    data for whoever holds the key without storing any of it, and a guessed row cannot be
    confirmed from a manifest or report without the key."""
    return keyed_sha256(
        json.dumps([example.prompt, example.answer, example.key], ensure_ascii=False).encode("utf-8") + b"\n"
        for example in examples
    )
