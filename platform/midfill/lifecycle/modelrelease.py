"""The ModelRelease state machine, pure: (spec, status, registry resolution, deployment) -> plan.

Target version: the resolved version once approved (and not just rolled back), else whatever is
serving. A different target, or a spec edited since the deployment was made, is deployed in place
(a RayService's serveConfigV2 on a cluster, `serve.run` locally).

"Available" means served: the platform reports the deployment running for the current spec AND the
endpoint itself (its /health, fetched by the adapter) reports the target version loaded and warmed
up. A version that fails to load, or is not served within rollout.healthDeadlineSeconds, is rolled
back to the stable version (phase Degraded while the rollback rolls, conditions Degraded and
RolledBack naming why). status.observedGeneration advances only once the edit it names is applied
(served, refused, or settled as Degraded), never while it is still rolling out.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from midfill.api import ModelRelease, SpecError, set_condition
from midfill.api.modelrelease import CanaryStatus, ModelReleaseStatus
from midfill.lifecycle import canary as canary_rollout
from midfill.lifecycle.canary import Deploy, Split
from midfill.lifecycle.clock import fmt_time
from midfill.lifecycle.stamping import ConditionStamper
from midfill.registry import RegistryError, RegistryUnavailable, approval_reason, unmet_approval


@dataclass(frozen=True)
class Resolution:
    """What the registry said: the version the alias/pin points at, and what it lacks for approval."""

    version: str | None = None
    error: str | None = None
    unmet: tuple[str, ...] = ()
    awaiting_alias: bool = False  # the model exists but no version carries the alias yet
    # MLflow did not answer (down, or a server error): the answer is unknown, not "not found";
    # the next pass asks again, and whatever serves keeps serving meanwhile.
    unavailable: bool = False


def resolve(registry: Any, release: ModelRelease) -> Resolution:
    """Blocking (MLflow): the version the release points at, and what it lacks for approval."""
    ref, approval = release.spec.model, release.spec.approval
    try:
        info = registry.get(ref.registered_model_name, version=ref.version, alias=ref.effective_alias())
    except RegistryUnavailable as exc:
        return Resolution(error=f"waiting for the model registry: {exc}", unavailable=True)
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
    # What the endpoint's /health says it serves, loaded and warmed up (None: unreachable, loading, other model).
    served: str | None = None
    # Why the deployment failed for good (the model failed to load, Serve gave up): no point waiting.
    failed: str | None = None
    # Strategy Canary: the canary version deployed beside `version` and its weight (percent), and
    # the split the endpoint itself reports (canary loaded, weight, numbers per version).
    canary: str | None = None
    canary_weight: int = 0
    split: Split | None = None


def served_by(health: Any, *, registered_model: str) -> tuple[str | None, str]:
    """Read an endpoint's /health answer (the JSON body, or None when unreachable): the version it
    serves loaded and warmed up (None if none, or another model), and what it said, for messages."""
    if not isinstance(health, dict):
        return None, "endpoint /health unreachable"
    name, version = health.get("registered_model"), health.get("version")
    if health.get("ready") is not True or not isinstance(version, str):
        return None, f"endpoint /health: {health.get('status', 'not ready')}"
    if name != registered_model:
        return None, f"endpoint serves {name} version {version}, not {registered_model}"
    return version, f"endpoint serves {name} version {version}"


@dataclass(frozen=True)
class Observed:
    now: dt.datetime
    resolution: Resolution
    deployment: DeploymentView | None = None


Action = Deploy


@dataclass
class Plan:
    status: ModelReleaseStatus
    actions: list[Action] = field(default_factory=list)


def _is_true(status: ModelReleaseStatus, type: str) -> bool:
    return any(c.type == type and c.status == "True" for c in status.conditions)


class _Machine(ConditionStamper[ModelReleaseStatus]):
    def __init__(
        self, release: ModelRelease, status: ModelReleaseStatus, observed: Observed, generation: int | None
    ) -> None:
        self.spec, self.observed, self.gen = release.spec, observed, generation
        self.status = status
        self.applied = False  # whether the status now reflects generation `gen` (observedGeneration)
        self.now = fmt_time(observed.now)
        self.plan = Plan(status)
        self.waiting = ""

    def phase(self, name: str, message: str) -> None:
        self.status.phase, self.status.message = name, message  # type: ignore[assignment]

    def approval(self) -> bool:
        """Record what the registry said; whether the resolved version may be served."""
        spec, res, status = self.spec, self.observed.resolution, self.status
        alias = spec.model.effective_alias()
        what = f"alias {alias!r}" if alias else f"version {spec.model.version}"
        if res.unavailable:
            self.cond("ModelResolved", "Unknown", "RegistryUnavailable", res.error or "")
            self.waiting = f"; {res.error}"
            return False
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
            self.applied = True
            self.cond("Progressing", "False", "Paused", "spec.paused is true")
            self.phase(
                "Paused",
                f"paused; serving version {serving or 'none'}" + (f", resolved {res.version}" if res.version else ""),
            )
        elif target is None:
            self.applied = True  # nothing to roll out until a version is approved
            reason = res.error or f"version {res.version} waits for: {', '.join(res.unmet)}"
            self.phase("WaitingForApproval" if res.version or res.awaiting_alias else "Pending", reason)
        elif dep is None:
            self.deploy(target, "Deploying", f"deploying version {target}")
        elif canary_rollout.wanted(self, target, dep):
            canary_rollout.step(self, target, dep)
        elif canary_rollout.handover(self, target, dep):
            pass
        elif serving != target:
            self.deploy(target, "Updating", f"rolling version {serving} -> {target} in place")
        elif dep.canary is not None:
            canary_rollout.remove(self, target, dep, "CanaryRemoved", f"version {target} serves 100%")
        elif dep.generation is not None and self.gen is not None and dep.generation != self.gen:
            self.deploy(
                target,
                "SpecChanged",
                f"the spec changed (generation {dep.generation} -> {self.gen}): redeploying version {target}",
            )
        else:
            self.settle(target, dep)

    def deploy_action(self, version: str, current: CanaryStatus | None = None) -> Deploy:
        router = self.spec.rollout.strategy == "Canary"
        if current is None:
            return Deploy(version, router=router)
        return Deploy(version, canary=current.version, weight=current.weight, router=router)

    def deploy_canary(self, stable: str, current: CanaryStatus, reason: str, message: str) -> None:
        self.plan.actions.append(self.deploy_action(stable, current))
        self.cond("Progressing", "True", reason, message)
        self.phase("Progressing", message + self.waiting)

    def deploy(self, version: str, reason: str, message: str) -> None:
        self.plan.actions.append(self.deploy_action(version))
        self.cond("Progressing", "True", reason, message)
        self.phase("Progressing", message + self.waiting)

    def settle(self, target: str, dep: DeploymentView) -> None:
        """The deployment is made for the target: served, still within its deadline, failed, or past it."""
        status = self.status
        status.url = dep.url
        if dep.healthy and dep.served == target:
            if status.stable_version != target:
                status.previous_stable_version = status.stable_version
                status.stable_version = target
            self.applied = True
            self.cond("Available", "True", "Healthy", f"version {target} is serving")
            self.cond("Progressing", "False", "Complete", f"version {target} is serving")
            self.cond("Degraded", "False", "Healthy", "")
            self.phase("Available", f"serving version {target}{self.waiting}")
            return
        deadline = self.spec.rollout.health_deadline_seconds
        started = dep.rollout_start or self.observed.now
        if dep.failed is None and (self.observed.now - started).total_seconds() <= deadline:
            self.phase("Progressing", f"waiting for version {target} to be served ({_why(dep, target)}){self.waiting}")
            return
        if dep.failed is not None:
            reason, why = "LoadFailed", f"version {target} failed to load: {dep.failed}"
        else:
            reason = "HealthDeadlineExceeded"
            why = f"version {target} not served within {deadline}s ({_why(dep, target)})"
        stable = status.stable_version
        if self.spec.rollout.auto_rollback and stable and stable != target:
            message = f"{why}; rolling back to version {stable}"
            self.plan.actions.append(self.deploy_action(stable))
            self.cond("RolledBack", "True", reason, f"{why}; rolled back to version {stable}")
            self.cond("Degraded", "True", reason, message)
            self.cond("Progressing", "True", "RollingBack", message)
            self.phase("Degraded", message)
            return
        self.applied = True  # nothing to go back to: this is where the edit ends
        self.cond("Progressing", "False", reason, why)
        self.cond("Degraded", "True", reason, why)
        self.cond("Available", "False", reason, why)
        self.phase("Degraded", why)


def _why(dep: DeploymentView, target: str) -> str:
    """What the platform and the endpoint say, for a status message."""
    if dep.served is not None and dep.served != target:
        return f"{dep.health}; the endpoint still serves version {dep.served}"
    return dep.health


def reconcile(
    release: ModelRelease | SpecError, *, status: ModelReleaseStatus, observed: Observed, generation: int | None
) -> Plan:
    """Next status and actions. `release` is the parsed resource, or the SpecError its parse raised."""
    status = status.model_copy(deep=True)
    if isinstance(release, SpecError):
        status.observed_generation = generation  # refused is applied: nothing will roll out
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
    if machine.applied:
        machine.plan.status.observed_generation = generation
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
