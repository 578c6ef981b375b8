"""Helpers for the chart tests (imported by tests/charts/*; fixtures live in conftest.py).

helm comes from `make tools` (.venv/bin/helm, see hack/fetch_k8s_tools.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "midfill"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "midfill"
NAMESPACE = "midfill-system"


def find_helm() -> Path | None:
    """helm next to this interpreter (the venv's bin, where `make tools` puts it), else on PATH."""
    beside = Path(sys.executable).parent / "helm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("helm")
    return Path(found) if found else None


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    """EnvVar list -> name: value (or the valueFrom dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
