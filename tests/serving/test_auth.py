from __future__ import annotations

import pytest

from serving.auth import KeyStore, key_from_headers


def test_keys_from_file_and_env_are_hashed(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# rotated monthly\nsk-a\n\nsk-b, sk-c\n")
    monkeypatch.setenv("MF_KEYS", "sk-d")
    store = KeyStore(keys_file=str(f), keys_env="MF_KEYS")
    assert all(store.check(k) for k in ("sk-a", "sk-b", "sk-c", "sk-d"))
    assert not store.check("sk-e") and not store.check(None) and not store.check("")
    assert all(k.digest.startswith("sha256:") and len(k.digest) == 71 for k in store._keys)
    assert "sk-a" not in repr(store._keys)


def test_rotated_key_file_is_picked_up(tmp_path):
    f = tmp_path / "keys"
    f.write_text("sk-old\n")
    store = KeyStore(keys_file=str(f))
    f.write_text("sk-new\n")
    import os

    os.utime(f, (1, 1))
    store._checked = -1e9
    assert store.check("sk-new") and not store.check("sk-old")


def test_auth_must_be_configured_or_explicitly_off(tmp_path):
    with pytest.raises(ValueError, match="disable auth explicitly"):
        KeyStore()
    empty = tmp_path / "keys"
    empty.write_text("# none yet\n")
    with pytest.raises(ValueError, match="no API keys"):
        KeyStore(keys_file=str(empty))
    assert KeyStore(disabled=True).check(None)


def test_key_headers():
    assert key_from_headers({"authorization": "Bearer sk-1"}) == "sk-1"
    assert key_from_headers({"x-api-key": "sk-2"}) == "sk-2"
    assert key_from_headers({"authorization": "Basic abc"}) is None
