"""The local ModelRelease backend's pure parts: API-key files and the Serve args it deploys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from midfill.api import ModelRelease, parse_resource
from midfill.apikeys import digest, parse
from midfill.local.serving import api_keys_file, ensure_api_key, local_serve_args
from midfill.local.state import StateStore
from midfill.registry import VersionInfo


def _release(**auth) -> ModelRelease:
    res = parse_resource(
        {
            "apiVersion": "midfill.dev/v1alpha1",
            "kind": "ModelRelease",
            "metadata": {"name": "rel"},
            "spec": {
                "model": {"registeredModelName": "m"},
                "auth": auth or {"apiKeySecretRef": {"name": "rel-keys", "key": "api-keys"}},
                "endpoint": {"resourcesPerReplica": {"requests": {"cpu": "4"}}},
                "serving": {"maxNewTokens": 32},
            },
        }
    )
    assert isinstance(res, ModelRelease)
    return res


def test_secret_maps_to_a_private_key_file_generated_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    path = api_keys_file(store, _release())
    assert path == tmp_path.resolve() / "secrets" / "rel-keys" / "api-keys"
    key = ensure_api_key(path)
    assert key and key.startswith("mf-") and len(key) > 20
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_api_key(path) is None  # kept, not replaced
    # Stored as a named digest, never raw.
    assert [(k.name, k.digest) for k in parse(path.read_text())] == [("default", digest(key))]
    assert key not in path.read_text()
    assert api_keys_file(store, _release(disabled=True)) is None


def test_serve_args_pin_the_version_and_fit_the_machine(tmp_path: Path) -> None:
    version = VersionInfo(name="m", version="7", source="file:///x")
    args = local_serve_args(_release(), version=version, tracking_uri="sqlite:///db", keys="/k")
    assert args.model_uri == "models:/m/7"
    assert args.served_model_name == "m"
    assert args.api_keys_file == "/k" and not args.auth_disabled
    assert args.max_new_tokens == 32
    # Capped: replicas share this machine's cores (the spec asks 4 CPUs per replica).
    assert args.num_cpus == min(4.0, float(os.cpu_count() or 1)) and args.num_gpus == 0.0
