"""What both state machines do the same way while they build a status: set a condition stamped
with the generation they reconcile and the observation's time."""

from __future__ import annotations

from typing import Generic, Literal, Protocol, TypeVar

from midfill.api import Condition, set_condition


class _HasConditions(Protocol):
    conditions: list[Condition]


S = TypeVar("S", bound=_HasConditions)


class ConditionStamper(Generic[S]):
    """Base of each machine's reconcile pass; it sets `status`, `gen` and `now` (RFC 3339)."""

    status: S
    gen: int | None
    now: str

    def cond(self, type: str, value: Literal["True", "False", "Unknown"], reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type=type,
            status=value,
            reason=reason,
            message=message,
            observed_generation=self.gen,
            now=self.now,
        )
