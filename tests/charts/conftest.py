"""Fixtures for the Helm chart tests: the helm binary and a renderer returning parsed objects.

Without helm the tests skip locally with the fix, and fail in CI (CI=true), where `make test`
always fetches it first (`make tools`, part of `make venv`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartutil import CHART, NAMESPACE, RELEASE, find_helm, run_helm

Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm() -> Path:
    path = find_helm()
    if path is None:
        message = "helm not found: run `make tools` (it puts helm and kubectl into .venv/bin)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the chart tests")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """render(values_file=None, set_values=(), include_crds=False) -> the rendered objects.

    Results are cached per argument set: the same render is used by several tests.
    """
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = {}

    def _render(
        values_file: Path | None = None, *, set_values: tuple[str, ...] = (), include_crds: bool = False
    ) -> list[dict[str, Any]]:
        key = (values_file, set_values, include_crds)
        if key not in cache:
            args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
            if values_file is not None:
                args += ["--values", str(values_file)]
            for item in set_values:
                args += ["--set", item]
            if include_crds:
                args.append("--include-crds")
            proc = run_helm(helm, *args)
            assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
            cache[key] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return cache[key]

    return _render
