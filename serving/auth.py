"""API keys: named keys (midfill.apikeys) from a file (a mounted Secret) or an environment variable,
kept only as SHA-256 digests, compared in constant time. A key arrives as `Authorization: Bearer <key>`
or `x-api-key`. The file is re-read every few seconds, so creating or revoking one key (editing the
Secret) reaches running replicas without a restart, and leaves the other keys working.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

from midfill.apikeys import NamedKey, digest, parse

log = logging.getLogger("ray.serve")

ANONYMOUS = NamedKey(name="anonymous", digest="")  # who a request is when auth is disabled


class KeyStore:
    """The accepted keys (hashed), by name."""

    RECHECK_S = 3.0

    def __init__(self, *, keys_file: str | None = None, keys_env: str | None = None, disabled: bool = False) -> None:
        if not disabled and not (keys_file or keys_env):
            raise ValueError("auth: give api_keys_file or api_keys_env, or disable auth explicitly")
        self.disabled = disabled
        self.keys_file = Path(keys_file) if keys_file else None
        self.keys_env = keys_env
        self._keys: list[NamedKey] = []
        self._text: str | None = None
        self._checked = 0.0
        if not disabled:
            self._load()
            if not self._keys:
                where = " and ".join(
                    w for w in (keys_file and f"file {keys_file}", keys_env and f"env {keys_env}") if w
                )
                raise ValueError(f"auth: no API keys found in {where}")

    def _read(self) -> str:
        if self.keys_file is not None and not self.keys_file.is_file():
            raise ValueError(f"api_keys_file: {self.keys_file} does not exist")
        return self.keys_file.read_text() if self.keys_file is not None else ""

    def _load(self, text: str | None = None) -> None:
        text = self._read() if text is None else text
        keys = parse(text, where=f"api_keys_file {self.keys_file}") if self.keys_file is not None else []
        if self.keys_env:
            keys += parse(os.environ.get(self.keys_env, ""), where=f"env {self.keys_env}")
        self._keys, self._text = keys, text
        self._checked = time.monotonic()

    def _maybe_reload(self) -> None:
        # The content, not the mtime, decides: a Secret update swaps a symlink, and two edits within
        # one mtime tick must not be missed. The file is small; reading it every few seconds is cheap.
        if self.keys_file is None or time.monotonic() - self._checked < self.RECHECK_S:
            return
        self._checked = time.monotonic()
        try:
            text = self._read()
            if text != self._text:
                self._load(text)
                log.info(
                    "midfill: API keys reloaded (%d keys: %s)", len(self._keys), ", ".join(k.name for k in self._keys)
                )
        except (OSError, ValueError) as exc:
            # Keep the keys we have rather than locking everyone out mid-rotation.
            log.warning("midfill: keeping the previous API keys: %s", exc)

    def identify(self, key: str | None) -> NamedKey | None:
        """The named key `key` is, or None. Compares against every stored digest so timing reveals nothing."""
        if self.disabled:
            return ANONYMOUS
        if not key:
            return None
        self._maybe_reload()
        wanted = digest(key).encode()
        found = None
        for stored in self._keys:
            if hmac.compare_digest(stored.digest.encode(), wanted):
                found = stored
        return found

    def check(self, key: str | None) -> bool:
        """True if `key` is accepted."""
        return self.identify(key) is not None


def key_from_headers(headers) -> str | None:
    """The key from `Authorization: Bearer <key>` or `x-api-key: <key>`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None
