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
    skip_e2e = pytest.mark.skip(reason="needs a real cluster: set KUBECONFIG (see docs/kubernetes.md)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "e2e" in item.keywords and not os.environ.get("KUBECONFIG"):
            item.add_marker(skip_e2e)


@pytest.fixture
def repo_root() -> Path:
    """The repository root (samples and manifests are read from here)."""
    return REPO_ROOT
