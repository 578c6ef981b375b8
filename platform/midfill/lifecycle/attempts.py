"""The attempts of a TrainingRun as history: one record per attempt in the status (its Job name,
MLflow run and outcome), which outlives the attempt's Job, and the clean-up decided from it (ending
the MLflow runs of attempts that are over, pruning all but the newest attempts). Pure, like the
machine in `midfill.lifecycle.trainingrun` that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from midfill.api.trainingrun import AttemptRecord, TrainingRunStatus


def attempt_name(run_name: str, attempt: int) -> str:
    """Fixed name of an attempt (a Job on a cluster, a torchx app locally): a retry finds the same one."""
    return f"{run_name}-a{attempt}"


@dataclass(frozen=True)
class EndRun:
    """End an attempt's MLflow run that is still RUNNING although the attempt is over (idempotent)."""

    attempt: int
    run_id: str
    status: Literal["FAILED", "KILLED"]


@dataclass(frozen=True)
class PruneAttempt:
    """Delete what an old, finished attempt left (its Job and ConfigMap); status.attempts keeps its pointers."""

    attempt: int
    name: str


def attempt_record(status: TrainingRunStatus, run_name: str, attempt: int) -> AttemptRecord:
    """The status' record of an attempt, added (in order) when missing."""
    for rec in status.attempts:
        if rec.attempt == attempt:
            return rec
    rec = AttemptRecord(attempt=attempt, job_name=attempt_name(run_name, attempt))
    status.attempts = sorted([*status.attempts, rec], key=lambda r: r.attempt)
    return next(r for r in status.attempts if r.attempt == attempt)


def ended(
    status: TrainingRunStatus, run_name: str, attempt: int, outcome: Literal["Succeeded", "Failed", "Killed"], why: str
) -> None:
    """Record how an attempt ended (the first word stands: a later sync must not rewrite history)."""
    rec = attempt_record(status, run_name, attempt)
    if rec.outcome is None:
        rec.outcome, rec.reason = outcome, why


def housekeeping(
    status: TrainingRunStatus,
    run_name: str,
    *,
    current: int,
    open_runs: dict[int, str],
    retained: tuple[int, ...],
    keep: int,
) -> list[EndRun | PruneAttempt]:
    """End the MLflow runs of attempts that are over, and prune all but the newest `keep` attempts.

    Decided from what was observed on every call (not on the transition only), so an MLflow that was
    down when an attempt ended, or a crash between acting and writing the status, is caught up later.
    """
    actions: list[EndRun | PruneAttempt] = []
    for attempt, run_id in sorted(open_runs.items()):
        rec = next((r for r in status.attempts if r.attempt == attempt), None)
        outcome = rec.outcome if rec is not None else None
        if outcome == "Succeeded" or (attempt >= current and outcome is None):
            continue  # still training, or finished by the trainer itself
        actions.append(EndRun(attempt, run_id, "FAILED" if outcome == "Failed" else "KILLED"))
    for attempt in sorted(retained):
        if attempt <= current - max(1, keep):
            actions.append(PruneAttempt(attempt, attempt_name(run_name, attempt)))
    return actions
