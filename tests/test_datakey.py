"""Data digests are keyed: a guessed request cannot be confirmed from a manifest without the operator's key."""

from __future__ import annotations

import hashlib
import hmac
import json
import re

import pytest

from undial_peft import UndialConfig
from undial_peft.data.readers import read_examples
from undial_peft.deploy.manifest import read_manifest
from undial_peft.errors import UndialConfigError
from undial_peft.training.forget import forget


def _plain_digests(row: dict[str, str]) -> set[str]:
    """What someone holding only the adapter could compute for a guessed one-row request."""
    line = json.dumps([row["question"], row["answer"], None], ensure_ascii=False).encode("utf-8") + b"\n"
    return {hashlib.sha256(line).hexdigest(), hmac.new(b"", line, hashlib.sha256).hexdigest()}


def test_a_guessed_one_row_request_cannot_be_confirmed_from_the_manifest(tiny_dir, facts, tmp_path):
    guess = facts[0]
    config = UndialConfig(max_steps=1, per_device_train_batch_size=1, disable_tqdm=True, report_to="none")
    adapter = forget(tiny_dir, [guess], tmp_path / "one-row", config=config)
    manifest_text = (adapter / "undial.json").read_text(encoding="utf-8")
    assert not any(digest in manifest_text for digest in _plain_digests(guess))
    from undial_peft.data.digests import data_digest, key_id

    # ... while the operator, who holds the key and the data, can still confirm it
    assert read_manifest(adapter)["data"]["hmac_sha256"] == data_digest(read_examples([guess]))
    assert read_manifest(adapter)["data"]["key_id"] == key_id()


def test_key_sources_and_that_the_digest_depends_on_the_key(monkeypatch, tmp_path):
    from undial_peft.data.digests import KEY_ENV, KEY_FILE_ENV, data_digest, data_key, default_key_path

    rows = read_examples([{"question": "Q?", "answer": "A."}])
    monkeypatch.setenv(KEY_ENV, "first operator key, long enough")
    first = data_digest(rows)
    monkeypatch.setenv(KEY_ENV, "second operator key, long enough")
    assert data_digest(rows) != first
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(UndialConfigError, match="no such key file"):
        data_key()
    monkeypatch.delenv(KEY_FILE_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    created = data_key()  # the default key file is created once, owner-only, and reused
    assert default_key_path().stat().st_mode & 0o077 == 0
    assert data_key() == created and len(created) == 64


@pytest.mark.parametrize("source", ["environment", "file"])
def test_one_length_rule_for_keys_from_the_environment_and_from_a_file(source, monkeypatch, tmp_path):
    """A one-character key once passed from UNDIAL_PEFT_DATA_KEY while a key file needed 16 bytes:
    both sources now take keys of 16 bytes and up, and refuse shorter ones naming where the key came
    from and how to generate one."""
    from undial_peft.data.digests import KEY_ENV, KEY_FILE_ENV, data_key

    def use(key: str) -> str:
        if source == "environment":
            monkeypatch.setenv(KEY_ENV, key)
            return KEY_ENV
        monkeypatch.delenv(KEY_ENV, raising=False)
        path = tmp_path / "data.key"
        path.write_text(key + "\n", encoding="utf-8")
        monkeypatch.setenv(KEY_FILE_ENV, str(path))
        return str(path)

    named = use("k")
    with pytest.raises(ValueError, match=rf"^{re.escape(named)}: the data key has 1 bytes, it needs at least 16; "
                                         r"generate one with python -c 'import secrets; print\(secrets.token_hex\(32\)\)'$"):
        data_key()
    use("x" * 16)
    assert data_key() == b"x" * 16
