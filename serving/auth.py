"""API keys: loaded from a file (a mounted Secret) or an environment variable, kept only as SHA-256
digests, compared in constant time. A key arrives as `Authorization: Bearer <key>` or `x-api-key`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str) -> list[str]:
    """Keys separated by newlines or commas; blank lines and # comments ignored."""
    keys = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys.extend(k.strip() for k in line.split(",") if k.strip())
    return keys


class KeyStore:
    """The accepted keys (hashed). A keys file is re-read when it changes, so rotating a Secret needs no restart."""

    RECHECK_S = 5.0

    def __init__(self, *, keys_file: str | None = None, keys_env: str | None = None, disabled: bool = False) -> None:
        if not disabled and not (keys_file or keys_env):
            raise ValueError("auth: give api_keys_file or api_keys_env, or disable auth explicitly")
        self.disabled = disabled
        self.keys_file = Path(keys_file) if keys_file else None
        self.keys_env = keys_env
        self._digests: list[bytes] = []
        self._mtime: float | None = None
        self._checked = 0.0
        if not disabled:
            self._load()
            if not self._digests:
                where = " and ".join(w for w in (keys_file and f"file {keys_file}", keys_env and f"env {keys_env}") if w)
                raise ValueError(f"auth: no API keys found in {where}")

    def _load(self) -> None:
        keys: list[str] = []
        if self.keys_file is not None:
            if not self.keys_file.is_file():
                raise ValueError(f"api_keys_file: {self.keys_file} does not exist")
            self._mtime = self.keys_file.stat().st_mtime
            keys += parse_keys(self.keys_file.read_text())
        if self.keys_env:
            keys += parse_keys(os.environ.get(self.keys_env, ""))
        self._digests = [_digest(k) for k in keys]
        self._checked = time.monotonic()

    def _maybe_reload(self) -> None:
        if self.keys_file is None or time.monotonic() - self._checked < self.RECHECK_S:
            return
        self._checked = time.monotonic()
        try:
            if self.keys_file.stat().st_mtime != self._mtime:
                self._load()
        except (OSError, ValueError):
            pass  # keep the keys we have rather than locking everyone out mid-rotation

    def check(self, key: str | None) -> bool:
        """True if `key` is accepted. Compares against every stored digest so timing reveals nothing."""
        if self.disabled:
            return True
        if not key:
            return False
        self._maybe_reload()
        digest = _digest(key)
        ok = False
        for stored in self._digests:
            ok |= hmac.compare_digest(stored, digest)
        return ok


def key_from_headers(headers) -> str | None:
    """The key from `Authorization: Bearer <key>` or `x-api-key: <key>`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None
