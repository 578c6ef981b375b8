"""The canary part of the ModelRelease state machine (spec.rollout.strategy: Canary), pure.

A newly approved version (the target) is deployed beside the stable one, and the endpoint routes the
step's share of traffic to it (spec.rollout.canarySteps), sticky per API key or `user`. Each pass
reads the live numbers the endpoint counted per version since the split was set (its /health, see
`split_from_health`) and judges the canary on them (spec.rollout.canary):

- a breach of any threshold (once the step has minRequests canary requests), a canary that fails to
  load or is not served within healthDeadlineSeconds: the canary goes to 0% (its deployment is
  removed), the stable version keeps 100%; conditions RolledBack and Degraded name the number, and
  the phase change to Degraded is the Warning event. The version is not tried again until another
  version resolves (as an InPlace rollback).
- within the thresholds for stepSeconds with minRequests canary requests: the next step; after the
  last (100%) step the canary is promoted: the stable deployment is rolled to its version while the
  canary keeps 100% of the traffic; once the stable slot serves it, the canary deployment is removed
  and the version is the stable one.

Routing is monotone in the weight (a key goes to the canary when its bucket is below the weight), so
an editor once on the canary stays on it through every later step and the promotion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from midfill.api.modelrelease import CanaryNumbers, CanarySpec, CanaryStatus
from midfill.lifecycle.clock import parse_time

if TYPE_CHECKING:
    from midfill.lifecycle.modelrelease import DeploymentView, _Machine


@dataclass(frozen=True)
class Deploy:
    """Serve `version` with the current spec: create the deployment, or update it in place. With
    strategy Canary the endpoint is a router, and `canary` (if any) serves beside it at `weight`%."""

    version: str
    canary: str | None = None
    weight: int = 0
    router: bool = False  # strategy Canary: the app routes between a stable and a canary slot


@dataclass(frozen=True)
class Split:
    """What the endpoint says about its traffic split: the canary it routes to, at which weight,
    whether the canary's replicas are loaded, and each version's numbers since the split was set."""

    canary: str | None = None
    weight: int = 0
    canary_ready: bool = False
    numbers: dict[str, CanaryNumbers] = field(default_factory=dict)


def numbers_from(raw: Any) -> CanaryNumbers:
    """One version's numbers from the endpoint's JSON (snake_case keys), error rate derived."""
    raw = raw if isinstance(raw, dict) else {}
    requests, errors = int(raw.get("requests") or 0), int(raw.get("errors") or 0)
    return CanaryNumbers(
        requests=requests,
        errors=errors,
        error_rate=round(errors / requests, 4) if requests else None,
        p95_latency_ms=raw.get("p95_latency_ms"),
        own_stop_rate=raw.get("own_stop_rate"),
        mean_completion_tokens=raw.get("mean_completion_tokens"),
    )


def split_from_health(health: Any) -> Split | None:
    """The split an endpoint's /health reports (None: not a canary-capable endpoint, or unreachable)."""
    if not isinstance(health, dict) or not isinstance(health.get("versions"), dict):
        return None
    raw = health.get("canary")
    canary: dict[str, Any] = raw if isinstance(raw, dict) else {}
    version = canary.get("version")
    return Split(
        canary=version if isinstance(version, str) else None,
        weight=int(canary.get("weight") or 0),
        canary_ready=canary.get("ready") is True,
        numbers={str(v): numbers_from(n) for v, n in health["versions"].items()},
    )


def breach(spec: CanarySpec, numbers: CanaryNumbers) -> str | None:
    """The first threshold the canary's numbers break, named with both values; None when within
    them (or when too few requests were counted to judge)."""
    if numbers.requests < spec.min_requests:
        return None
    checks = [
        ("error rate", numbers.error_rate, "maxErrorRate", spec.max_error_rate, 1),
        ("p95 latency (ms)", numbers.p95_latency_ms, "maxP95LatencyMs", spec.max_p95_latency_ms, 1),
        ("own-stop rate", numbers.own_stop_rate, "minOwnStopRate", spec.min_own_stop_rate, -1),
        (
            "mean completion tokens",
            numbers.mean_completion_tokens,
            "maxMeanCompletionTokens",
            spec.max_mean_completion_tokens,
            1,
        ),
    ]
    for what, value, name, limit, sign in checks:
        if value is None or limit is None:
            continue
        if sign * (value - limit) > 0:
            relation = ">" if sign > 0 else "<"
            return f"{what} {value:g} {relation} {name} {limit:g} over {numbers.requests} canary requests"
    return None


def wanted(machine: _Machine, target: str, dep: DeploymentView) -> bool:
    """Whether the target rolls out as a canary: strategy Canary, a stable version serving in the
    stable slot, and the target is another version not already promoted."""
    status = machine.status
    stable, current = status.stable_version, status.canary
    if machine.spec.rollout.strategy != "Canary" or stable is None or target == stable or dep.version != stable:
        return False
    return not (current is not None and current.version == target and current.state == "Promoted")


def step(machine: _Machine, target: str, dep: DeploymentView) -> None:
    """One pass of a canary rollout of `target` beside the stable version."""
    status, steps = machine.status, machine.spec.rollout.canary_steps
    stable = status.stable_version
    assert stable is not None
    current = status.canary
    if current is None or current.version != target or current.state != "Running":
        status.canary = CanaryStatus(version=target, step=0, weight=steps[0], step_started=machine.now)
        machine.deploy_canary(
            stable, status.canary, "CanaryStarted", f"canary version {target} takes {steps[0]}% beside {stable}"
        )
        return
    edited = dep.generation is not None and machine.gen is not None and dep.generation != machine.gen
    if (dep.canary, dep.canary_weight) != (target, current.weight) or edited:
        machine.deploy_canary(
            stable, current, "CanaryUpdating", f"deploying canary version {target} at {current.weight}%"
        )
        return
    status.url = dep.url
    _judge(machine, current, dep)


def _judge(machine: _Machine, current: CanaryStatus, dep: DeploymentView) -> None:
    spec, rollout, now = machine.spec.rollout.canary, machine.spec.rollout, machine.observed.now
    split, version, stable = dep.split, current.version, machine.status.stable_version
    if split is None or split.canary != version or not split.canary_ready or split.weight != current.weight:
        started = dep.rollout_start or now
        if dep.failed is not None:
            _roll_back(machine, current, dep, "LoadFailed", f"canary version {version} failed to load: {dep.failed}")
        elif (now - started).total_seconds() > rollout.health_deadline_seconds:
            _roll_back(
                machine,
                current,
                dep,
                "HealthDeadlineExceeded",
                f"canary version {version} not served at {current.weight}% within "
                f"{rollout.health_deadline_seconds}s ({dep.health})",
            )
        else:
            machine.phase("Progressing", f"waiting for canary version {version} to be served ({dep.health})")
        return
    numbers = split.numbers.get(version, CanaryNumbers())
    current.canary_numbers = numbers
    current.stable_numbers = split.numbers.get(stable or "")
    broken = breach(spec, numbers)
    if broken is not None:
        _roll_back(machine, current, dep, "CanaryThresholdBreached", f"canary version {version}: {broken}")
        return
    held = (now - (parse_time(current.step_started) or now)).total_seconds()
    where = f"canary version {version} at {current.weight}% beside {stable}"
    if numbers.requests < spec.min_requests:
        current.verdict = f"holding: {numbers.requests} of {spec.min_requests} canary requests needed to judge"
    elif held < spec.step_seconds:
        current.verdict = f"within thresholds after {held:.0f}s of {spec.step_seconds}s"
    else:
        _advance(machine, current, where)
        return
    machine.cond("Progressing", "True", "CanaryHolding", f"{where}: {current.verdict}")
    machine.phase("Progressing", f"{where}: {current.verdict}")


def _advance(machine: _Machine, current: CanaryStatus, where: str) -> None:
    steps, stable = machine.spec.rollout.canary_steps, machine.status.stable_version
    assert stable is not None
    if current.step + 1 < len(steps):
        current.verdict = f"step {current.step + 1} of {len(steps)} ({current.weight}%) passed"
        current.step += 1
        current.weight = steps[current.step]
        current.step_started = machine.now
        machine.deploy_canary(
            stable,
            current,
            "CanaryStepped",
            f"{current.verdict}: canary version {current.version} takes {current.weight}%",
        )
        return
    # The stable slot is rolled to the canary's version while the canary keeps 100%: no editor goes
    # back to the old version; the canary's deployment is removed once the stable slot serves it.
    current.state = "Promoted"
    current.verdict = f"all {len(steps)} steps passed: promoted"
    machine.deploy_canary(
        current.version, current, "CanaryPromoted", f"{where}: {current.verdict}; rolling it into the stable slot"
    )


def handover(machine: _Machine, target: str, dep: DeploymentView) -> bool:
    """A promoted canary still holds 100% while the stable slot loads its version: remove the canary
    once the stable slot serves it, else wait for it there (or roll back past the deadline, as any
    new version). False when the deployment is not in that handover."""
    if dep.canary is None or dep.canary != target or dep.version != target:
        return False
    if dep.healthy and dep.served == target:
        remove(machine, target, dep, "CanaryHandedOver", f"version {target} serves from the stable slot")
    else:
        machine.settle(target, dep)
    return True


def remove(machine: _Machine, stable: str, dep: DeploymentView, reason: str, why: str) -> None:
    """Take the canary's deployment away in two steps: weight 0 first, and only once the endpoint
    reports it routes nothing there, the deployment itself (a request the router already sent to a
    deployment being removed would wait for replicas that never come)."""
    assert dep.canary is not None
    if dep.canary_weight != 0:
        machine.plan.actions.append(Deploy(stable, canary=dep.canary, weight=0, router=True))
        machine.cond("Progressing", "True", reason, f"{why}; canary version {dep.canary} goes to 0%")
        machine.phase(
            machine.status.phase if machine.status.phase == "Degraded" else "Progressing",
            f"{why}; canary version {dep.canary} goes to 0%",
        )
    elif dep.split is not None and dep.split.weight != 0:
        machine.phase(machine.status.phase, f"{why}; waiting for the router to send nothing to version {dep.canary}")
    else:
        machine.deploy(stable, reason, f"{why}; removing canary version {dep.canary}")


def _roll_back(machine: _Machine, current: CanaryStatus, dep: DeploymentView, reason: str, why: str) -> None:
    """The canary goes to 0%: its deployment is removed, the stable version takes all traffic."""
    stable = machine.status.stable_version
    assert stable is not None
    deployed = dep.canary == current.version
    current.state, current.weight, current.verdict = "RolledBack", 0, why
    message = f"{why}; canary rolled back to 0%, version {stable} serves 100%"
    # Weight 0 first (the canary's deployment goes once the router sends nothing there: `remove`).
    machine.plan.actions.append(Deploy(stable, canary=current.version if deployed else None, weight=0, router=True))
    machine.cond("RolledBack", "True", reason, message)
    machine.cond("Degraded", "True", reason, message)
    machine.cond("Progressing", "True", "RollingBack", message)
    machine.phase("Degraded", message)
