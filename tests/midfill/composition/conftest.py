"""Fixtures of the composition tests (helpers in helpers.py)."""

from __future__ import annotations

import pytest

from .helpers import tiny_llama


@pytest.fixture
def parents():
    """(anchor: 4 layers × 64, augment: 4 layers × 32), different seeds and widths."""
    return tiny_llama(hidden=64, layers=4, seed=0), tiny_llama(hidden=32, layers=4, seed=1)
