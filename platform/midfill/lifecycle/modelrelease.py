"""The ModelRelease state machine, pure: (spec, status, registry resolution, deployment) -> plan.

Target version: the resolved version once approved (and not just rolled back), else whatever is
serving. A different target, or a spec edited since the deployment was made, is deployed in place
(a RayService's serveConfigV2 on a cluster, `serve.run` locally); a version that is not healthy
within rollout.healthDeadlineSeconds is rolled back to the previous stable version.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from midfill.api import ModelRelease, SpecError, set_condition
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.lifecycle.clock import fmt_time
from midfill.registry import RegistryError, approval_reason, unmet_approval


@dataclass(frozen=True)
class Resolution:
    """What the registry said: the version the alias/pin points at, and what it lacks for approval."""

    version: str | None = None
    error: str | None = None
    unmet: tuple[str, ...] = ()
    awaiting_alias: bool = False  # the model exists but no version carries the alias yet


def resolve(registry: Any, release: ModelRelease) -> Resolution:
    """Blocking (MLflow): the version the release points at, and what it lacks for approval."""
    ref, approval = release.spec.model, release.spec.approval
    try:
        info = registry.get(ref.registered_model_name, version=ref.version, alias=ref.effective_alias())
    except RegistryError as exc:
        alias = ref.version is None and "has no alias" in str(exc)
        hint = f"; approve a version: midfill approve {ref.registered_model_name} --version N" if alias else ""
        return Resolution(error=f"{exc}{hint}", awaiting_alias=alias)
    unmet = unmet_approval(
        info,
        required_tags=approval.required_tags,
        required_alias=approval.required_alias,
        min_metrics=approval.min_metrics,
    )
    return Resolution(version=info.version, unmet=tuple(unmet))


@dataclass(frozen=True)
class DeploymentView:
    """The serving deployment as its adapter saw it (a RayService, or the local Serve app)."""

    version: str | None
    rollout_start: dt.datetime | None
    healthy: bool
    health: str
    url: str | None = None
    generation: int | None = None  # the release generation the deployment was made from (None: unknown)


@dataclass(frozen=True)
class Observed:
    now: dt.datetime
    resolution: Resolution
    deployment: DeploymentView | None = None


@dataclass(frozen=True)
class Deploy:
    """Serve `version` with the current spec: create the deployment, or update it in place."""

    version: str


Action = Deploy


@dataclass
class Plan:
    status: ModelReleaseStatus
    actions: list[Action] = field(default_factory=list)


def _is_true(status: ModelReleaseStatus, type: str) -> bool:
    return any(c.type == type and c.status == "True" for c in status.conditions)


class _Machine:
    def __init__(
        self, release: ModelRelease, status: ModelReleaseStatus, observed: Observed, generation: int | None
    ) -> None:
        self.spec, self.observed, self.gen = release.spec, observed, generation
        self.status = status
        self.now = fmt_time(observed.now)
        self.plan = Plan(status)
        self.waiting = ""

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

    def phase(self, name: str, message: str) -> None:
        self.status.phase, self.status.message = name, message  # type: ignore[assignment]

    def approval(self) -> bool:
        """Record what the registry said; whether the resolved version may be served."""
        spec, res, status = self.spec, self.observed.resolution, self.status
        alias = spec.model.effective_alias()
        what = f"alias {alias!r}" if alias else f"version {spec.model.version}"
        if res.error is not None or res.version is None:
            self.cond("ModelResolved", "False", "NotFound", res.error or f"{what} does not resolve")
            return False
        self.cond(
            "ModelResolved", "True", "Resolved", f"{spec.model.registered_model_name} {what} -> version {res.version}"
        )
        if res.version != status.resolved_version and _is_true(status, "RolledBack"):
            self.cond("RolledBack", "False", "NewVersion", f"version {res.version} replaces the rolled-back one")
        status.resolved_version = res.version
        if res.unmet:
            self.cond(
                "Approved",
                "False",
                approval_reason(res.unmet),
                f"version {res.version} waits for: {', '.join(res.unmet)}",
            )
            self.waiting = f"; version {res.version} waits for: {', '.join(res.unmet)}"
            return False
        self.cond("Approved", "True", "Approved", f"version {res.version} meets the approval requirements")
        return True

    def step(self) -> None:
        res, dep, status = self.observed.resolution, self.observed.deployment, self.status
        approved = self.approval()
        serving = dep.version if dep else None
        # Still True only while the resolution is the version that was rolled back (cleared above otherwise).
        rejected = _is_true(status, "RolledBack")
        target = res.version if approved and not rejected else (serving or status.stable_version)
        if self.spec.paused:
            self.cond("Progressing", "False", "Paused", "spec.paused is true")
            self.phase(
                "Paused",
                f"paused; serving version {serving or 'none'}" + (f", resolved {res.version}" if res.version else ""),
            )
        elif target is None:
            reason = res.error or f"version {res.version} waits for: {', '.join(res.unmet)}"
            self.phase("WaitingForApproval" if res.version or res.awaiting_alias else "Pending", reason)
        elif dep is None:
            self.deploy(target, "Deploying", f"deploying version {target}")
        elif serving != target:
            self.deploy(target, "Updating", f"rolling version {serving} -> {target} in place")
        elif dep.generation is not None and self.gen is not None and dep.generation != self.gen:
            self.deploy(
                target,
                "SpecChanged",
                f"the spec changed (generation {dep.generation} -> {self.gen}): redeploying version {target}",
            )
        else:
            self.settle(target, dep)

    def deploy(self, version: str, reason: str, message: str) -> None:
        self.plan.actions.append(Deploy(version))
        self.cond("Progressing", "True", reason, message)
        self.phase("Progressing", message + self.waiting)

    def settle(self, target: str, dep: DeploymentView) -> None:
        """The deployment serves the target: healthy, still within its deadline, or past it."""
        status = self.status
        status.url = dep.url
        if dep.healthy:
            if status.stable_version != target:
                status.previous_stable_version = status.stable_version
                status.stable_version = target
            self.cond("Available", "True", "Healthy", f"version {target} is serving")
            self.cond("Progressing", "False", "Complete", f"version {target} is serving")
            self.cond("Degraded", "False", "Healthy", "")
            self.phase("Available", f"serving version {target}{self.waiting}")
            return
        deadline = self.spec.rollout.health_deadline_seconds
        started = dep.rollout_start or self.observed.now
        if (self.observed.now - started).total_seconds() <= deadline:
            self.phase("Progressing", f"waiting for version {target} to become healthy ({dep.health}){self.waiting}")
            return
        stable = status.stable_version
        if self.spec.rollout.auto_rollback and stable and stable != target:
            message = f"version {target} not healthy within {deadline}s ({dep.health}); rolled back to version {stable}"
            self.plan.actions.append(Deploy(stable))
            self.cond("RolledBack", "True", "HealthDeadlineExceeded", message)
            self.cond("Progressing", "True", "RollingBack", message)
            self.phase("Progressing", message)
            return
        message = f"version {target} not healthy within {deadline}s ({dep.health})"
        self.cond("Degraded", "True", "HealthDeadlineExceeded", message)
        self.cond("Available", "False", "HealthDeadlineExceeded", message)
        self.phase("Degraded", message)


def reconcile(
    release: ModelRelease | SpecError, *, status: ModelReleaseStatus, observed: Observed, generation: int | None
) -> Plan:
    """Next status and actions. `release` is the parsed resource, or the SpecError its parse raised."""
    status = status.model_copy(deep=True)
    status.observed_generation = generation
    if isinstance(release, SpecError):
        message = "invalid spec: " + "; ".join(f"{e.path}: {e.message}" for e in release.errors)
        status.conditions = set_condition(
            status.conditions,
            type="Available",
            status="False",
            reason="InvalidSpec",
            message=message,
            observed_generation=generation,
            now=fmt_time(observed.now),
        )
        status.phase, status.message = "Failed", message
        return Plan(status)
    machine = _Machine(release, status, observed, generation)
    machine.step()
    return machine.plan


def endpoint_down(
    status: ModelReleaseStatus, *, reason: str, message: str, generation: int | None, now: dt.datetime
) -> ModelReleaseStatus:
    """The process serving the release is gone (local backend: its controller stopped or died)."""
    status = status.model_copy(deep=True)
    status.conditions = set_condition(
        status.conditions,
        type="Available",
        status="False",
        reason=reason,
        message=message,
        observed_generation=generation,
        now=fmt_time(now),
    )
    status.phase, status.message, status.url = "Degraded", message, None
    return status


def endpoint_starting(status: ModelReleaseStatus, *, message: str) -> ModelReleaseStatus:
    """The process that serves the release is (re)starting (local backend: `midfill apply` started its
    controller): nothing is known about the deployment until the first reconcile."""
    status = status.model_copy(deep=True)
    status.phase = "Pending" if status.stable_version is None else "Progressing"
    status.message = message
    return status
