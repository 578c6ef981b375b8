"""Named API keys: the format of the key Secret (and of its local stand-in file).

One key per line, stored hashed, never raw:

    # NAME  DIGEST             [limits]
    team-a  sha256:9f86d08...  rpm=60 tpm=20000
    ci-bot  sha256:60303ae...

NAME names the key in metrics, logs and errors (team, tool or person); `rpm` / `tpm` optionally
limit that key's requests and tokens (prompt + completion) per minute on each replica. A line
holding bare keys (older files: one key per line or comma-separated) is still accepted; such a key
is named `key-<first 8 hex digits of its digest>`, so even then no raw key is ever shown.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
LIMITS = ("rpm", "tpm")


def digest(key: str) -> str:
    """The stored form of a key: sha256:<hex>."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "mf-" + secrets.token_urlsafe(24)


@dataclass(frozen=True)
class NamedKey:
    name: str
    digest: str  # sha256:<hex>
    rpm: int | None = None
    tpm: int | None = None

    def line(self) -> str:
        limits = "".join(f" {k}={getattr(self, k)}" for k in LIMITS if getattr(self, k) is not None)
        return f"{self.name} {self.digest}{limits}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"key name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _named(fields: list[str], where: str) -> NamedKey:
    name, dig, *opts = fields
    check_name(name)
    if not _DIGEST_RE.match(dig):
        raise ValueError(f"{where}: digest of key {name!r} must be sha256:<64 lowercase hex digits>")
    limits: dict[str, int] = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in LIMITS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{where}: {opt!r} on key {name!r}; limits are rpm=N and tpm=N with N >= 1")
        limits[key] = int(value)
    return NamedKey(name=name, digest=dig, **limits)


def parse(text: str, *, where: str = "keys") -> list[NamedKey]:
    """Every key of a keys file; ValueError naming the line for anything malformed or duplicated."""
    keys: list[NamedKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) >= 2 and fields[1].startswith("sha256:"):
            keys.append(_named(fields, f"{where} line {number}"))
        else:  # bare keys (the older format)
            for bare in (k.strip() for k in line.split(",") if k.strip()):
                d = digest(bare)
                keys.append(NamedKey(name=f"key-{d[7:15]}", digest=d))
    seen: set[str] = set()
    for k in keys:
        if k.name in seen:
            raise ValueError(f"{where}: key name {k.name!r} appears twice; names must be unique")
        seen.add(k.name)
    return keys


def render(keys: list[NamedKey]) -> str:
    return "# midfill API keys: NAME sha256:DIGEST [rpm=N] [tpm=N]\n" + "".join(k.line() + "\n" for k in keys)


class KeyFile:
    """A keys file edited in place (the local stand-in for the Secret); every write is atomic, mode 0600."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def keys(self) -> list[NamedKey]:
        return parse(self.path.read_text(), where=str(self.path)) if self.path.exists() else []

    def _write(self, keys: list[NamedKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(render(keys))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def create(self, name: str, *, rpm: int | None = None, tpm: int | None = None) -> str:
        """Add a key named `name`; returns the raw key (shown once, stored only as its digest)."""
        check_name(name)
        keys = self.keys()
        if any(k.name == name for k in keys):
            raise ValueError(f"key {name!r} already exists in {self.path}; revoke it first or pick another name")
        key = new_key()
        self._write([*keys, NamedKey(name=name, digest=digest(key), rpm=rpm, tpm=tpm)])
        return key

    def revoke(self, name: str) -> None:
        keys = self.keys()
        if not any(k.name == name for k in keys):
            known = ", ".join(k.name for k in keys) or "none"
            raise ValueError(f"no key named {name!r} in {self.path} (keys: {known})")
        self._write([k for k in keys if k.name != name])
