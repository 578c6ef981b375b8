"""Suite-wide pytest configuration: tiers (slow/gpu/e2e) and hygiene shared by all components."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # e2e talks to whatever cluster the kubeconfig names: it runs only when asked for by name, never
    # because a developer's or CI pod's KUBECONFIG happens to be set.
    skip_e2e = pytest.mark.skip(reason="needs a real cluster: set MIDFILL_E2E=1 and KUBECONFIG (see docs/operator.md)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "e2e" in item.keywords and not (os.environ.get("MIDFILL_E2E") == "1" and os.environ.get("KUBECONFIG")):
            item.add_marker(skip_e2e)


@pytest.fixture
def repo_root() -> Path:
    """The repository root (samples and manifests are read from here)."""
    return REPO_ROOT
