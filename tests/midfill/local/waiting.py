"""Polling for the local backend's tests: its supervisor and release controller run in other
processes, so a test waits for the state it expects (never for a fixed time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], *, timeout: float, what: str, poll: float = 0.5) -> T:
    """Call `check` every `poll` seconds until it returns something truthy, and return that; past
    `timeout` seconds fail, naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")
