"""The ModelRelease state machine, pure: (spec, status, registry resolution, RayService) -> plan.

Target version: the resolved version once approved (and not just rolled back), else whatever is
serving. A different target is rolled in place by rewriting serveConfigV2; a version that is not
healthy within rollout.healthDeadlineSeconds is rolled back to the previous stable version.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from midfill.api import ModelRelease, SpecError, set_condition
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.registry import approval_reason
from operators.modelrelease.builders import ANNOTATION_ROLLOUT_START, ANNOTATION_VERSION, APP_NAME, endpoint_url
from operators.trainingrun.reconcile import fmt_time, parse_time


@dataclass(frozen=True)
class Resolution:
    """What the registry said: the version the alias/pin points at, and what it lacks for approval."""

    version: str | None = None
    error: str | None = None
    unmet: tuple[str, ...] = ()


@dataclass(frozen=True)
class RayServiceView:
    version: str | None
    rollout_start: dt.datetime | None
    healthy: bool
    health: str


def rayservice_view(obj: dict[str, Any]) -> RayServiceView:
    """Read a RayService: our version annotation, and whether KubeRay reports the app RUNNING for
    the current spec (status.observedGeneration caught up with metadata.generation)."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    status = obj.get("status") or {}
    app = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(APP_NAME) or {}
    app_status = app.get("status", "")
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    current = observed is None or generation is None or observed >= generation
    healthy = app_status == "RUNNING" and current
    health = f"application {APP_NAME}: {app_status or 'no status yet'}" + ("" if current else " (for an older spec)")
    if app.get("message"):
        health += f": {app['message']}"
    return RayServiceView(
        version=annotations.get(ANNOTATION_VERSION),
        rollout_start=parse_time(annotations.get(ANNOTATION_ROLLOUT_START)),
        healthy=healthy,
        health=health,
    )


@dataclass(frozen=True)
class Observed:
    now: dt.datetime
    resolution: Resolution
    rayservice: RayServiceView | None = None


@dataclass(frozen=True)
class CreateRayService:
    version: str


@dataclass(frozen=True)
class UpdateVersion:
    """Rewrite serveConfigV2 of the running RayService (in place)."""

    version: str


Action = CreateRayService | UpdateVersion


@dataclass
class Plan:
    status: ModelReleaseStatus
    actions: list[Action] = field(default_factory=list)


def _is_true(status: ModelReleaseStatus, type: str) -> bool:
    return any(c.type == type and c.status == "True" for c in status.conditions)


def reconcile(release: ModelRelease | SpecError, *, status: ModelReleaseStatus, observed: Observed,
              generation: int | None) -> Plan:
    status = status.model_copy(deep=True)
    now = fmt_time(observed.now)

    def cond(type: str, value: Literal["True", "False", "Unknown"], reason: str, message: str = "") -> None:
        status.conditions = set_condition(status.conditions, type=type, status=value, reason=reason,
                                          message=message, observed_generation=generation, now=now)

    def phase(name: str, message: str) -> None:
        status.phase, status.message = name, message  # type: ignore[assignment]

    status.observed_generation = generation
    if isinstance(release, SpecError):
        message = "invalid spec: " + "; ".join(f"{e.path}: {e.message}" for e in release.errors)
        cond("Available", "False", "InvalidSpec", message)
        phase("Failed", message)
        return Plan(status)

    spec = release.spec
    res = observed.resolution
    what = f"alias {spec.model.effective_alias()!r}" if spec.model.effective_alias() else f"version {spec.model.version}"
    approved = False
    if res.error is not None or res.version is None:
        cond("ModelResolved", "False", "NotFound", res.error or f"{what} does not resolve")
    else:
        cond("ModelResolved", "True", "Resolved", f"{spec.model.registered_model_name} {what} -> version {res.version}")
        if res.version != status.resolved_version and _is_true(status, "RolledBack"):
            cond("RolledBack", "False", "NewVersion", f"version {res.version} replaces the rolled-back one")
        status.resolved_version = res.version
        approved = not res.unmet
        if approved:
            cond("Approved", "True", "Approved", f"version {res.version} meets the approval requirements")
        else:
            cond("Approved", "False", approval_reason(res.unmet), f"version {res.version} waits for: {', '.join(res.unmet)}")

    rs = observed.rayservice
    serving = rs.version if rs else None
    # Still True only while the resolution is the version that was rolled back (cleared above otherwise).
    rejected = _is_true(status, "RolledBack")
    target = res.version if approved and not rejected else (serving or status.stable_version)
    waiting = "" if approved or res.version is None else f"; version {res.version} waits for: {', '.join(res.unmet)}"
    plan = Plan(status)

    if spec.paused:
        cond("Progressing", "False", "Paused", "spec.paused is true")
        phase("Paused", f"paused; serving version {serving or 'none'}" + (f", resolved {res.version}" if res.version else ""))
        return plan
    if target is None:
        reason = res.error or f"version {res.version} waits for: {', '.join(res.unmet)}"
        phase("WaitingForApproval" if res.version else "Pending", reason)
        return plan
    if rs is None:
        plan.actions.append(CreateRayService(target))
        cond("Progressing", "True", "Deploying", f"creating RayService with version {target}")
        phase("Progressing", f"deploying version {target}{waiting}")
        return plan
    if serving != target:
        plan.actions.append(UpdateVersion(target))
        cond("Progressing", "True", "Updating", f"updating serveConfigV2 in place: version {serving} -> {target}")
        phase("Progressing", f"rolling version {serving} -> {target} in place{waiting}")
        return plan

    status.url = endpoint_url(release)
    if rs.healthy:
        if status.stable_version != target:
            status.previous_stable_version = status.stable_version
            status.stable_version = target
        cond("Available", "True", "Healthy", f"version {target} is serving")
        cond("Progressing", "False", "Complete", f"version {target} is serving")
        cond("Degraded", "False", "Healthy", "")
        phase("Available", f"serving version {target}{waiting}")
        return plan
    deadline = spec.rollout.health_deadline_seconds
    started = rs.rollout_start or observed.now
    if (observed.now - started).total_seconds() <= deadline:
        phase("Progressing", f"waiting for version {target} to become healthy ({rs.health}){waiting}")
        return plan
    stable = status.stable_version
    if spec.rollout.auto_rollback and stable and stable != target:
        message = f"version {target} not healthy within {deadline}s ({rs.health}); rolled back to version {stable}"
        plan.actions.append(UpdateVersion(stable))
        cond("RolledBack", "True", "HealthDeadlineExceeded", message)
        cond("Progressing", "True", "RollingBack", message)
        phase("Progressing", message)
        return plan
    message = f"version {target} not healthy within {deadline}s ({rs.health})"
    cond("Degraded", "True", "HealthDeadlineExceeded", message)
    cond("Available", "False", "HealthDeadlineExceeded", message)
    phase("Degraded", message)
    return plan
