"""Watch an engine from a test: wait until it holds no request, count the decode steps it ran meanwhile.

A cancellation test must not pass because the request ended by itself: it counts the decode steps
run between the cancellation and the freed row, which a request that was not cancelled would fill
with the rest of its max_tokens.
"""

from __future__ import annotations

import time


def wait_idle(engine, timeout_s: float = 120) -> None:
    """Until the engine runs and queues nothing (bounded: a request left running fails the test)."""
    deadline = time.monotonic() + timeout_s
    while engine.stats() != {"running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, f"engine still busy after {timeout_s}s: {engine.stats()}"
        time.sleep(0.01)
