"""`midfill keys create|list|revoke` on a release's Secret stand-in: named keys, stored hashed."""

from __future__ import annotations

import re
import stat

from midfill.api import parse_resource
from midfill.apikeys import digest, parse
from midfill.local.state import StateStore

RELEASE = {
    "apiVersion": "midfill.dev/v1alpha1",
    "kind": "ModelRelease",
    "metadata": {"name": "rel"},
    "spec": {"model": {"registeredModelName": "m"}, "auth": {"apiKeySecretRef": {"name": "rel-keys"}}},
}


def _shown_key(output: str) -> str:
    return re.search(r": (mf-\S+)$", output.strip())[1]


def test_create_list_revoke_on_the_releases_secret(cli, state_dir):
    assert cli("keys", "list").exit_code == 1  # no release yet: says so
    StateStore(state_dir).apply(parse_resource(RELEASE))
    a = cli("keys", "create", "team-a", "--rpm", "60")
    b = cli("keys", "create", "ci-bot", "-r", "rel", "--tpm", "5000")
    assert a.exit_code == 0 and b.exit_code == 0
    key_a, key_b = _shown_key(a.output), _shown_key(b.output)
    path = state_dir.resolve() / "secrets" / "rel-keys" / "api-keys"
    text = path.read_text()
    assert key_a not in text and key_b not in text and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(k.name, k.digest, k.rpm, k.tpm) for k in parse(text)] == [
        ("team-a", digest(key_a), 60, None),
        ("ci-bot", digest(key_b), None, 5000),
    ]

    listed = cli("keys", "list").output
    assert "team-a" in listed and "ci-bot" in listed and key_a not in listed

    dup = cli("keys", "create", "team-a")
    assert dup.exit_code == 1 and "already exists" in dup.output
    assert cli("keys", "revoke", "team-a").exit_code == 0
    assert [k.name for k in parse(path.read_text())] == ["ci-bot"]
    gone = cli("keys", "revoke", "team-a")
    assert gone.exit_code == 1 and "no key named 'team-a'" in gone.output and "ci-bot" in gone.output


def test_bad_names_and_limits_are_refused_naming_the_fix(cli, tmp_path):
    keys = tmp_path / "keys.txt"
    bad = cli("keys", "create", "no spaces", "--file", str(keys))
    assert bad.exit_code == 1 and "letters, digits" in bad.output and not keys.exists()
    assert cli("keys", "create", "x", "--file", str(keys), "--rpm", "0").exit_code == 2  # typer: --rpm >= 1
    keys.write_text("team sha256:abc\n")
    broken = cli("keys", "list", "--file", str(keys))
    assert broken.exit_code == 1 and "line 1" in broken.output and "sha256:<64" in broken.output
