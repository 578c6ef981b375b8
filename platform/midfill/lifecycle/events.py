"""The event a status change emits: one per phase change, the same on both backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WARNING_PHASES = ("Failed", "Degraded", "Restarting")


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def phase_event(before: str | None, after: str | None, message: str | None) -> Event | None:
    """An event named after the new phase when the phase changed (kubectl describe / midfill describe)."""
    if after is None or before == after:
        return None
    return Event("Warning" if after in WARNING_PHASES else "Normal", after, message or "")
