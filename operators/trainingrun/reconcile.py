"""The TrainingRun state machine, pure: (spec, status, observed Jobs, progress, registry) -> plan.

A plan is the next status plus the actions to take (start attempt N, delete a Job). Handlers do
the I/O around it: observe, call `reconcile`, act, write the status once if it changed. Every
decision is taken again from scratch on each call, so running it twice (a retry, a restart of the
operator, a timer firing alongside a watch event) converges on the same objects.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from midfill.api import SpecError, TrainingRun, set_condition
from midfill.api.trainingrun import CheckpointRef, Progress, RegisteredModelRef, TrainingRunStatus
from midfill.progress import ProgressRecord
from operators.trainingrun.builders import LABEL_ATTEMPT, job_name

ACTIVE_PHASES = ("Pending", "Queued", "Starting", "Running", "Restarting", "Suspended")
_EXIT_CODE = re.compile(r"exit code (\d+)")


# -- observations -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobView:
    """What reconcile needs from one attempt's Job."""

    attempt: int
    name: str
    suspended: bool = False
    created: dt.datetime | None = None
    start_time: dt.datetime | None = None
    ready: int = 0
    outcome: Literal["Succeeded", "Failed"] | None = None
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    deleting: bool = False


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def fmt_time(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_view(job: dict[str, Any]) -> JobView | None:
    """Read a Job dict (as the API returns it); None when it is not one of our attempts."""
    meta = job.get("metadata") or {}
    try:
        attempt = int((meta.get("labels") or {}).get(LABEL_ATTEMPT, ""))
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
    return JobView(
        attempt=attempt,
        name=meta.get("name", ""),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        created=parse_time(meta.get("creationTimestamp")),
        start_time=parse_time(status.get("startTime")),
        ready=int(status.get("ready") or 0),
        outcome=outcome,
        reason=reason or "",
        message=message or "",
        exit_code=int(code.group(1)) if code else None,
        deleting=bool(meta.get("deletionTimestamp")),
    )


@dataclass(frozen=True)
class Observed:
    """The world as the handler saw it just now."""

    now: dt.datetime
    jobs: dict[int, JobView] = field(default_factory=dict)
    progress: ProgressRecord | None = None
    registered: RegisteredModelRef | None = None


# -- actions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartAttempt:
    attempt: int
    active_deadline_seconds: int | None = None


@dataclass(frozen=True)
class DeleteJob:
    name: str


Action = StartAttempt | DeleteJob


@dataclass
class Plan:
    status: TrainingRunStatus
    actions: list[Action] = field(default_factory=list)


def current_attempt(status: TrainingRunStatus, observed: Observed) -> int:
    """The newest attempt: a Job created just before a crash counts even if status never said so."""
    return max([status.attempt, *observed.jobs])


def needs_registry_lookup(status: TrainingRunStatus, observed: Observed) -> bool:
    """Whether the handler must ask the registry for the run's version (only after success)."""
    if status.registered_model is not None:
        return False
    job = observed.jobs.get(current_attempt(status, observed))
    return status.phase == "Succeeded" or (job is not None and job.outcome == "Succeeded")


def needs_resync(status: dict[str, Any] | None) -> bool:
    """Timer filter: active runs, and succeeded runs still waiting for their registered version."""
    status = status or {}
    phase = status.get("phase", "Pending")
    return phase in ACTIVE_PHASES or (phase == "Succeeded" and not status.get("registeredModel"))


# -- the state machine ---------------------------------------------------------------------------------
class _Machine:
    def __init__(self, run: TrainingRun, status: TrainingRunStatus, observed: Observed, generation: int | None) -> None:
        self.run, self.spec, self.observed, self.gen = run, run.spec, observed, generation
        self.status = status
        self.now = fmt_time(observed.now)
        self.actions: list[Action] = []

    def cond(self, type: str, status: Literal["True", "False", "Unknown"], reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type=type, status=status, reason=reason, message=message,
            observed_generation=self.gen, now=self.now,
        )

    def set_phase(self, phase: str, message: str) -> None:
        self.status.phase = phase  # type: ignore[assignment]
        self.status.message = message

    def remaining_deadline(self) -> int | None:
        limit = self.spec.active_deadline_seconds
        start = parse_time(self.status.start_time)
        if limit is None:
            return None
        if start is None:
            return limit
        return int(limit - (self.observed.now - start).total_seconds())

    # -- transitions -------------------------------------------------------------------------------
    def start(self, attempt: int, *, phase: str, message: str) -> None:
        self.actions.append(StartAttempt(attempt, self.remaining_deadline()))
        self.status.attempt = attempt
        self.status.active_job_name = job_name(self.run.metadata.name, attempt)
        self.status.start_time = self.status.start_time or self.now
        self.cond("PodsReady", "False", "Starting", f"attempt {attempt} is starting")
        self.cond("Running", "False", "Starting", f"attempt {attempt} is starting")
        self.set_phase(phase, message)

    def fail(self, reason: str, message: str) -> None:
        self.status.completion_time = self.status.completion_time or self.now
        self.cond("Failed", "True", reason, message)
        self.cond("Running", "False", reason, message)
        self.cond("Restarting", "False", reason, message)
        self.set_phase("Failed", message)

    def attempt_failed(self, attempt: int, reason: str, detail: str) -> None:
        """An attempt died: restart the whole gang (resuming from the newest checkpoint) or give up."""
        policy = self.spec.failure_policy
        what = f"attempt {attempt} failed ({reason}{': ' + detail if detail else ''})"
        if reason in ("NonRetryableExitCode", "DeadlineExceeded"):
            self.fail(reason, what)
        elif self.status.restart_count < policy.max_restarts:
            self.status.restart_count += 1
            message = (f"{what}; restart {self.status.restart_count}/{policy.max_restarts}: attempt "
                       f"{attempt + 1} resumes from the latest checkpoint")
            self.cond("Restarting", "True", reason, message)
            self.start(attempt + 1, phase="Restarting", message=message)
        else:
            self.fail("MaxRestartsExceeded", f"{what}; no restarts left (failurePolicy.maxRestarts={policy.max_restarts})")

    def succeed(self, attempt: int) -> None:
        self.status.completion_time = self.status.completion_time or self.now
        self.cond("Succeeded", "True", "JobComplete", f"attempt {attempt} completed")
        self.cond("Running", "False", "Completed", f"attempt {attempt} completed")
        self.cond("Restarting", "False", "Completed", "")
        self.set_phase("Succeeded", f"attempt {attempt} completed")
        self.registration()

    def registration(self) -> None:
        found = self.observed.registered
        if found is not None:
            self.status.registered_model = found
            self.cond("ModelRegistered", "True", "Registered", f"{found.uri}")
            self.status.message = f"registered {found.uri}"
        elif self.status.registered_model is None:
            self.cond("ModelRegistered", "False", "VersionNotFound",
                      f"no version of {self.run.registered_model_name()!r} is tagged with this run's uid yet; checked again on each resync")

    def progress(self) -> None:
        rec = self.observed.progress
        if rec is None:
            return
        self.status.progress = Progress(
            step=rec.step, total_steps=rec.total_steps or self.spec.training.total_steps(),
            loss=rec.loss, tokens_per_second=rec.tokens_per_second, update_time=rec.update_time,
        )
        if rec.checkpoint_uri and rec.checkpoint_step is not None:
            self.status.last_checkpoint = CheckpointRef(uri=rec.checkpoint_uri, step=rec.checkpoint_step, time=rec.checkpoint_time)

    def run_active(self, job: JobView) -> None:
        """An attempt whose Job exists and has not finished."""
        nodes = self.spec.parallelism.num_nodes
        queue = self.spec.scheduling.queue_name
        if job.suspended:
            self.cond("Queued", "True", "WaitingForAdmission", f"Job {job.name} waits for Kueue queue {queue!r} to admit {nodes} pods")
            self.set_phase("Queued", f"attempt {job.attempt} is queued in {queue!r}")
            return
        if queue:
            self.cond("Queued", "False", "Admitted", f"admitted by Kueue queue {queue!r}")
        ready_before = any(c.type == "PodsReady" and c.status == "True" for c in self.status.conditions)
        if ready_before or job.ready >= nodes:
            self.cond("PodsReady", "True", "AllPodsReady", f"{nodes}/{nodes} pods of {job.name} ready")
            self.cond("Running", "True", "Training", f"attempt {job.attempt} is training")
            self.cond("Restarting", "False", "Running", "")
            step = f" at step {self.status.progress.step}" if self.status.progress else ""
            self.set_phase("Running", f"attempt {job.attempt} is training{step}")
            return
        started = job.start_time or job.created
        timeout = self.spec.scheduling.startup_timeout_seconds
        if started is not None and (self.observed.now - started).total_seconds() > timeout:
            # Free the GPUs the partial gang holds instead of waiting for a gang that cannot form.
            self.actions.append(DeleteJob(job.name))
            self.attempt_failed(job.attempt, "StartupTimeout", f"only {job.ready}/{nodes} pods ready after {timeout}s")
            return
        restarting = any(c.type == "Restarting" and c.status == "True" for c in self.status.conditions)
        self.set_phase("Restarting" if restarting else "Starting",
                       self.status.message if restarting else f"attempt {job.attempt}: {job.ready}/{nodes} pods ready")

    def step(self) -> None:
        st = self.status
        attempt = current_attempt(st, self.observed)
        job = self.observed.jobs.get(attempt)
        live = job if job is not None and not job.deleting else None
        if attempt > st.attempt:  # found a Job the status does not know about (crash after create)
            st.attempt, st.active_job_name = attempt, job_name(self.run.metadata.name, attempt)
            st.start_time = st.start_time or self.now

        if st.phase == "Succeeded":
            self.registration()
            return
        if st.phase == "Failed":
            return
        self.progress()
        if job is not None and job.outcome == "Succeeded":
            self.succeed(attempt)
            return
        if job is not None and job.outcome == "Failed":
            codes = self.spec.failure_policy.non_retryable_exit_codes
            if job.reason == "PodFailurePolicy" and (job.exit_code is None or job.exit_code in codes):
                self.attempt_failed(attempt, "NonRetryableExitCode", f"exit code {job.exit_code}: {job.message}")
            elif job.reason == "DeadlineExceeded":
                self.attempt_failed(attempt, "DeadlineExceeded",
                                    f"spec.activeDeadlineSeconds={self.spec.active_deadline_seconds} reached")
            else:
                self.attempt_failed(attempt, "AttemptFailed", job.message or job.reason)
            return
        if self.spec.suspend:
            if live is not None:
                self.actions.append(DeleteJob(live.name))
            self.cond("Running", "False", "Suspended", "spec.suspend is true")
            self.set_phase("Suspended", "suspended (checkpoints are kept); set spec.suspend: false to resume")
            return
        remaining = self.remaining_deadline()
        if remaining is not None and remaining <= 0 and st.attempt > 0:
            if live is not None:
                self.actions.append(DeleteJob(live.name))
            self.fail("DeadlineExceeded", f"spec.activeDeadlineSeconds={self.spec.active_deadline_seconds} reached")
            return
        if live is None:
            if attempt == 0:
                self.start(1, phase="Queued" if self.spec.scheduling.queue_name else "Starting", message="attempt 1 is starting")
            elif st.phase in ("Suspended", "Pending"):
                # Resuming after suspend (or after a spec fix): a fresh attempt, not a failure.
                self.cond("Restarting", "False", "Resumed", "")
                self.start(attempt + 1, phase="Starting", message=f"resuming: attempt {attempt + 1} starts from the latest checkpoint")
            else:
                self.attempt_failed(attempt, "JobDeleted", f"Job {job_name(self.run.metadata.name, attempt)} was deleted")
            return
        self.run_active(live)


def reconcile(run: TrainingRun | SpecError, *, status: TrainingRunStatus, observed: Observed,
              generation: int | None, name: str = "") -> Plan:
    """Next status and actions. `run` is the parsed resource, or the SpecError its parse raised."""
    status = status.model_copy(deep=True)
    now = fmt_time(observed.now)
    if isinstance(run, SpecError):
        message = "invalid spec: " + "; ".join(f"{e.path}: {e.message}" for e in run.errors)
        actions: list[Action] = [DeleteJob(j.name) for j in observed.jobs.values() if j.outcome is None and not j.deleting]
        status.conditions = set_condition(status.conditions, type="Failed", status="True", reason="InvalidSpec",
                                          message=message, observed_generation=generation, now=now)
        status.phase, status.message, status.observed_generation = "Failed", message, generation
        return Plan(status, actions)
    failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
    if status.phase == "Failed" and failed is not None and failed.reason == "InvalidSpec" and status.observed_generation != generation:
        # The spec was fixed: carry on (a new attempt resumes from the checkpoints).
        status.conditions = set_condition(status.conditions, type="Failed", status="False", reason="SpecFixed",
                                          message="the spec is valid again", observed_generation=generation, now=now)
        status.phase, status.message = "Pending", "spec fixed"
    machine = _Machine(run, status, observed, generation)
    machine.step()
    machine.status.observed_generation = generation
    return Plan(machine.status, machine.actions)
