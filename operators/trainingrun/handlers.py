"""Thin kopf handlers for TrainingRuns: observe, reconcile (pure), act, write status once if changed.

Every trigger (create/update/resume, the resync timer, any change of one of our Jobs) ends in
`sync`, which takes a per-run lock and re-reads the run, so concurrent triggers never act on a
stale status. Children carry ownerReferences (the cluster's garbage collector removes them with the
run); `cleanup` also deletes them when the operator sees the run go, which is what removes them
where no garbage collector runs (the test emulator) and makes the removal immediate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from midfill.api import GROUP, VERSION, FieldError, SpecError, TrainingRun
from midfill.api.trainingrun import RegisteredModelRef, TrainingRunStatus
from midfill.lifecycle.clock import parse_time
from midfill.lifecycle.trainingrun import (
    DEADLINE,
    NON_RETRYABLE,
    AttemptView,
    DeleteAttempt,
    EndRun,
    Observed,
    PruneAttempt,
    StartAttempt,
    needs_registry_lookup,
    needs_resync,
    reconcile,
)
from operators import common
from operators.kube import CONFIGMAPS, JOBS, SERVICES, TRAININGRUNS, Kube
from operators.settings import OperatorSettings
from operators.trainingrun import builders

RESYNC_SECONDS = OperatorSettings().resync_seconds
TERMINAL = ("Succeeded", "Failed")
# MLflow (SQLAlchemy/HTTP) calls get their own small pool so a slow tracking server never holds up
# the Kubernetes calls queued in the default executor.
_MLFLOW_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlflow")
_EXIT_CODE = re.compile(r"exit code (\d+)")
# The Job's own words for why it ended, in the machine's terms (a Pod failure policy only fails a
# Job for the non-retryable exit codes).
_JOB_REASONS = {"PodFailurePolicy": NON_RETRYABLE, "DeadlineExceeded": DEADLINE}


def job_view(job: dict[str, Any]) -> AttemptView | None:
    """Read a Job dict (as the API returns it); None when it is not one of our attempts."""
    meta = job.get("metadata") or {}
    try:
        attempt = int((meta.get("labels") or {}).get(builders.LABEL_ATTEMPT, ""))
    except ValueError:
        return None
    status = job.get("status") or {}
    outcome, reason, message = None, "", ""
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        # Complete/Failed are final; SuccessCriteriaMet/FailureTarget (1.31+) come first and are as final.
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            outcome, reason, message = "Succeeded", cond.get("reason", ""), cond.get("message", "")
        elif cond.get("type") in ("Failed", "FailureTarget"):
            outcome, reason, message = "Failed", cond.get("reason", ""), cond.get("message", "")
    code = _EXIT_CODE.search(message) if outcome == "Failed" else None
    return AttemptView(
        attempt=attempt,
        name=meta.get("name", ""),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        created=parse_time(meta.get("creationTimestamp")),
        start_time=parse_time(status.get("startTime")),
        ready=int(status.get("ready") or 0),
        outcome=outcome,  # type: ignore[arg-type]
        reason=_JOB_REASONS.get(reason or "", reason or ""),
        message=message or "",
        exit_code=int(code.group(1)) if code else None,
        deleting=bool(meta.get("deletionTimestamp")),
    )


async def observe(
    kube: Kube,
    memo: Any,
    run: TrainingRun | SpecError,
    status: TrainingRunStatus,
    body: dict[str, Any],
    logger: kopf.Logger,
    *,
    read_progress: bool,
) -> Observed:
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid")
    jobs = await _attempt_jobs(kube, namespace, name, uid, since=status.attempt)
    # Only attempts old enough to be pruned are looked for (no list calls while there are few).
    retained = await retained_attempts(
        kube, namespace, name, uid, below=status.attempt - memo.settings.keep_attempts + 1
    )
    observed = Observed(now=dt.datetime.now(dt.UTC), jobs=jobs, retained=retained)
    if not memo.settings.tracking_uri or not (status.attempt or jobs):
        return observed
    registry = memo.registry()
    experiment = run.spec.registry.experiment_name if isinstance(run, TrainingRun) else None
    progress = registered = None
    open_runs: dict[int, str] = {}
    loop = asyncio.get_running_loop()
    try:
        # Progress is the timer's job (watch events carry none); no Job yet means nothing to report.
        # Runs still RUNNING: those of attempts that are over are ended (the machine decides); asked on
        # the timer (with the progress, one search), and at once when an attempt ends or is stopped.
        wants_progress = isinstance(run, TrainingRun) and read_progress and jobs and status.phase not in TERMINAL
        if wants_progress:
            progress, open_runs = await loop.run_in_executor(
                _MLFLOW_POOL, lambda: registry.run_overview(uid, experiment_name=experiment)
            )
        elif read_progress or _attempt_ending(run, jobs):
            open_runs = await loop.run_in_executor(
                _MLFLOW_POOL, lambda: registry.open_attempt_runs(uid, experiment_name=experiment)
            )
        if isinstance(run, TrainingRun) and needs_registry_lookup(status, observed):
            found = await loop.run_in_executor(_MLFLOW_POOL, registry.find_by_run_uid, run.registered_model_name(), uid)
            if found is not None:
                registered = RegisteredModelRef(name=found.name, version=found.version, uri=found.uri)
    except Exception as exc:  # MLflow down must not stop the Jobs from being managed
        logger.warning(f"MLflow at {memo.settings.tracking_uri} not readable: {exc}")
    return Observed(
        now=observed.now, jobs=jobs, progress=progress, registered=registered, open_runs=open_runs, retained=retained
    )


async def _attempt_jobs(
    kube: Kube, namespace: str, name: str, uid: str | None, *, since: int
) -> dict[int, AttemptView]:
    """The run's Jobs by attempt: the status' attempt (`since`), and any newer one created just before
    a crash. A Job of that name owned by another run (a deleted one of the same name) is deleted."""
    jobs = {}
    attempt = max(since, 1)
    while True:
        raw = await kube.get(JOBS, namespace, builders.job_name(name, attempt))
        if raw is None:
            if attempt > since:
                break
        else:
            owners = common.owner_uids(raw)
            view = job_view(raw)
            if view is not None and (uid in owners or not owners):
                jobs[attempt] = view
            elif view is not None and not view.deleting:  # left over from a deleted run of the same name
                await kube.delete(JOBS, namespace, view.name)
        attempt += 1
    return jobs


def _attempt_ending(run: TrainingRun | SpecError, jobs: dict[int, AttemptView]) -> bool:
    """Whether this sync may end an attempt (so its MLflow run may have to be ended now)."""
    stopping = isinstance(run, SpecError) or run.spec.suspend
    return stopping or any(j.outcome is not None or j.deleting for j in jobs.values())


async def retained_attempts(kube: Kube, namespace: str, name: str, uid: str | None, *, below: int) -> tuple[int, ...]:
    """Attempts older than `below` whose Job or ConfigMap (owned by this run) still exist."""
    if below <= 1:
        return ()
    found: set[int] = set()
    for res in (JOBS, CONFIGMAPS):
        for obj in await kube.list(res, namespace, {builders.LABEL_RUN: name, **builders.MANAGED_BY}):
            meta = obj.get("metadata") or {}
            attempt = (meta.get("labels") or {}).get(builders.LABEL_ATTEMPT, "")
            if attempt.isdigit() and int(attempt) < below and uid in common.owner_uids(obj):
                found.add(int(attempt))
    return tuple(sorted(found))


async def act(
    kube: Kube, memo: Any, namespace: str, run: TrainingRun | SpecError, actions: list, logger: kopf.Logger
) -> None:
    settings: OperatorSettings = memo.settings
    for action in actions:
        if isinstance(action, StartAttempt) and isinstance(run, TrainingRun):
            for obj in builders.build_attempt(
                run, attempt=action.attempt, settings=settings, active_deadline_seconds=action.active_deadline_seconds
            ):
                res = {"ConfigMap": CONFIGMAPS, "Service": SERVICES, "Job": JOBS}[obj["kind"]]
                created = await kube.create(res, namespace, obj)
                if created and obj["kind"] == "Job":
                    logger.info(f"created Job {obj['metadata']['name']}")
        elif isinstance(action, DeleteAttempt):
            if await kube.delete(JOBS, namespace, action.name):
                logger.info(f"deleted Job {action.name}")
        elif isinstance(action, PruneAttempt):
            for res in (JOBS, CONFIGMAPS):
                await kube.delete(res, namespace, action.name)
            logger.info(f"deleted the Job and ConfigMap of old attempt {action.name} (kept in status.attempts)")
        elif isinstance(action, EndRun):
            await end_run(memo, action, logger)


async def end_run(memo: Any, action: EndRun, logger: kopf.Logger) -> None:
    """Mark an over attempt's MLflow run FAILED/KILLED; MLflow down only delays it to a later sync."""
    registry = memo.registry()
    loop = asyncio.get_running_loop()
    try:
        if await loop.run_in_executor(_MLFLOW_POOL, registry.end_run, action.run_id, action.status):
            logger.info(f"ended MLflow run {action.run_id} of attempt {action.attempt} as {action.status}")
    except Exception as exc:
        logger.warning(f"could not end MLflow run {action.run_id} of attempt {action.attempt}: {exc}")


def refuse_unshared(run: TrainingRun | SpecError, settings: OperatorSettings) -> TrainingRun | SpecError:
    """A multi-node run without shared checkpoint storage is an invalid spec here (it depends on the
    operator's claim, so the schema alone cannot refuse it): failed once, not retried forever."""
    problem = builders.shared_storage_problem(run, settings) if isinstance(run, TrainingRun) else None
    return SpecError([FieldError("spec.parallelism.numNodes", problem)]) if problem else run


async def sync(memo: Any, namespace: str, name: str, logger: kopf.Logger, *, read_progress: bool = False) -> None:
    """Bring one TrainingRun's children and status in line with its spec (idempotent)."""
    kube: Kube = memo.kube
    async with common.object_lock("tr", namespace, name):
        body = await kube.get(TRAININGRUNS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        run, status, raw_status = common.split_body(body, TrainingRunStatus)
        run = refuse_unshared(run, memo.settings)
        observed = await observe(kube, memo, run, status, body, logger, read_progress=read_progress)
        plan = reconcile(
            run,
            status=status,
            observed=observed,
            generation=body["metadata"].get("generation"),
            run_name=name,
            keep_attempts=memo.settings.keep_attempts,
        )
        await act(kube, memo, namespace, run, plan.actions, logger)
        await common.write_status(kube, TRAININGRUNS, body, raw_status, plan.status, logger)


@kopf.on.resume(GROUP, VERSION, "trainingruns")
@kopf.on.create(GROUP, VERSION, "trainingruns")
@kopf.on.update(GROUP, VERSION, "trainingruns", field="spec")
async def trainingrun_changed(name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    namespace = common.namespaced(namespace)
    await sync(memo, namespace, name, logger)


@kopf.timer(
    GROUP,
    VERSION,
    "trainingruns",
    interval=RESYNC_SECONDS,
    initial_delay=RESYNC_SECONDS,
    when=lambda status, **_: needs_resync(dict(status)),
)
async def trainingrun_resync(name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Edge-triggered handlers miss what happens outside the API (time passing, MLflow): check it here."""
    namespace = common.namespaced(namespace)
    await sync(memo, namespace, name, logger, read_progress=True)


@kopf.on.event("batch", "v1", "jobs", labels={builders.LABEL_RUN: kopf.PRESENT, **builders.MANAGED_BY})
async def job_event(
    labels: Mapping[str, str], namespace: str | None, type: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """A Job of ours changed (pods ready, failed, completed): re-check its TrainingRun now."""
    namespace = common.namespaced(namespace)
    await sync(memo, namespace, labels[builders.LABEL_RUN], logger)


@kopf.on.event(GROUP, VERSION, "trainingruns")
async def trainingrun_deleted(
    type: str | None, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    namespace = common.namespaced(namespace)
    if type != "DELETED":
        return
    await cleanup(memo.kube, namespace=namespace, name=name, uid=body["metadata"].get("uid"), logger=logger)
    common.forget_lock("tr", namespace, name)


async def cleanup(kube: Kube, *, namespace: str, name: str, uid: str | None, logger: kopf.Logger) -> None:
    """Delete every child of a deleted run (only those it owns: a new run of the same name keeps its own)."""
    selector = {builders.LABEL_RUN: name, **builders.MANAGED_BY}
    for res in (JOBS, CONFIGMAPS, SERVICES):
        for obj in await kube.list(res, namespace, selector):
            if uid in common.owner_uids(obj):
                await kube.delete(res, namespace, obj["metadata"]["name"])
                logger.info(
                    f"deleted {obj.get('kind') or res.plural} {obj['metadata']['name']} of deleted TrainingRun {name}"
                )
