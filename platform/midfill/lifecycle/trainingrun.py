"""The TrainingRun state machine, pure: (spec, status, observed attempts, progress, registry) -> plan.

A plan is the next status plus the actions to take (start attempt N, delete an attempt). Adapters
do the I/O around it: the operator observes Jobs and creates/deletes them, the local backend
observes torchrun processes and starts/cancels them. Every decision is taken again from scratch on
each call, so running it twice (a retry, a restarted operator or supervisor, a timer firing
alongside a watch event) converges on the same objects.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from midfill.api import SpecError, TrainingRun, set_condition
from midfill.api.trainingrun import CheckpointRef, Progress, RegisteredModelRef, TrainingRunStatus
from midfill.lifecycle.attempts import EndRun, PruneAttempt, attempt_name, attempt_record, ended, housekeeping
from midfill.lifecycle.clock import fmt_time, parse_time
from midfill.lifecycle.stamping import ConditionStamper
from midfill.progress import ProgressRecord

ACTIVE_PHASES = ("Pending", "Queued", "Starting", "Running", "Restarting", "Suspended")
TERMINAL_PHASES = ("Succeeded", "Failed")
SETTLED_PHASES = (*TERMINAL_PHASES, "Suspended")  # nothing runs until the spec or an apply changes it
# Reasons an attempt can end with (AttemptView.reason) that are not retried.
NON_RETRYABLE = "NonRetryableExitCode"
DEADLINE = "DeadlineExceeded"
# Attempts whose Job and ConfigMap are kept (the newest ones; older ones are deleted, status.attempts
# keeps their Job name and MLflow run). Operator setting MIDFILL_KEEP_ATTEMPTS.
KEEP_ATTEMPTS = 3


# -- observations -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttemptView:
    """What the machine needs from one attempt (a Job, or a local torchrun), as its adapter saw it.

    `ready` counts the nodes whose processes run; `reason` is NonRetryableExitCode or
    DeadlineExceeded when the runtime itself ended the attempt for that reason, else free text.
    """

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


@dataclass(frozen=True)
class Observed:
    """The world as the adapter saw it just now."""

    now: dt.datetime
    jobs: dict[int, AttemptView] = field(default_factory=dict)
    progress: ProgressRecord | None = None
    registered: RegisteredModelRef | None = None
    # attempt -> id of its MLflow run while that run is still RUNNING (empty when MLflow was not asked).
    open_runs: dict[int, str] = field(default_factory=dict)
    # Attempts older than the status' attempt whose children (Job, ConfigMap) still exist.
    retained: tuple[int, ...] = ()


# -- actions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartAttempt:
    attempt: int
    active_deadline_seconds: int | None = None


@dataclass(frozen=True)
class DeleteAttempt:
    name: str


Action = StartAttempt | DeleteAttempt | EndRun | PruneAttempt


@dataclass
class Plan:
    status: TrainingRunStatus
    actions: list[Action] = field(default_factory=list)


def current_attempt(status: TrainingRunStatus, observed: Observed) -> int:
    """The newest attempt: one started just before a crash counts even if status never said so."""
    return max([status.attempt, *observed.jobs])


def needs_registry_lookup(status: TrainingRunStatus, observed: Observed) -> bool:
    """Whether the adapter must ask the registry for the run's version (only after success)."""
    if status.registered_model is not None:
        return False
    job = observed.jobs.get(current_attempt(status, observed))
    return status.phase == "Succeeded" or (job is not None and job.outcome == "Succeeded")


def wants_processes(phase: str | None) -> bool:
    """Whether something must be running the run's attempts in this phase."""
    return phase not in SETTLED_PHASES


def needs_resync(status: dict | None) -> bool:
    """Active runs, and succeeded runs still waiting for their registered version."""
    status = status or {}
    phase = status.get("phase", "Pending")
    return phase in ACTIVE_PHASES or (phase == "Succeeded" and not status.get("registeredModel"))


# -- the state machine ---------------------------------------------------------------------------------
class _Machine(ConditionStamper[TrainingRunStatus]):
    def __init__(self, run: TrainingRun, status: TrainingRunStatus, observed: Observed, generation: int | None) -> None:
        self.run, self.spec, self.observed, self.gen = run, run.spec, observed, generation
        self.status = status
        self.now = fmt_time(observed.now)
        self.actions: list[Action] = []

    def set_phase(self, phase: str, message: str | None) -> None:
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
        attempt_record(self.status, self.run.metadata.name, attempt)
        self.status.attempt = attempt
        self.status.active_job_name = attempt_name(self.run.metadata.name, attempt)
        self.status.start_time = self.status.start_time or self.now
        self.status.completion_time = None
        self.cond("PodsReady", "False", "Starting", f"attempt {attempt} is starting")
        self.cond("Running", "False", "Starting", f"attempt {attempt} is starting")
        self.set_phase(phase, message)

    def fail(self, reason: str, message: str) -> None:
        self.status.completion_time = self.status.completion_time or self.now
        self.status.active_job_name = None
        self.cond("Failed", "True", reason, message)
        self.cond("Running", "False", reason, message)
        self.cond("Restarting", "False", reason, message)
        self.set_phase("Failed", message)

    def attempt_failed(self, attempt: int, reason: str, detail: str) -> None:
        """An attempt died: restart the whole gang (resuming from the newest checkpoint) or give up."""
        policy = self.spec.failure_policy
        ended(self.status, self.run.metadata.name, attempt, "Failed", reason)
        what = f"attempt {attempt} failed ({reason}{': ' + detail if detail else ''})"
        if reason == NON_RETRYABLE:
            self.fail(reason, f"{what}; not retried: fix the spec and apply again")
        elif reason == DEADLINE:
            self.fail(reason, what)
        elif self.status.restart_count < policy.max_restarts:
            self.status.restart_count += 1
            message = (
                f"{what}; restart {self.status.restart_count}/{policy.max_restarts}: attempt "
                f"{attempt + 1} resumes from the latest checkpoint"
            )
            self.cond("Restarting", "True", reason, message)
            self.start(attempt + 1, phase="Restarting", message=message)
        else:
            self.fail(
                "MaxRestartsExceeded", f"{what}; no restarts left (failurePolicy.maxRestarts={policy.max_restarts})"
            )

    def succeed(self, attempt: int) -> None:
        ended(self.status, self.run.metadata.name, attempt, "Succeeded", "JobComplete")
        self.status.completion_time = self.status.completion_time or self.now
        self.status.active_job_name = None
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
            self.cond(
                "ModelRegistered",
                "False",
                "VersionNotFound",
                f"no version of {self.run.registered_model_name()!r} is tagged with this run's uid yet; "
                "checked again on each resync",
            )

    def progress(self) -> None:
        st, name = self.status, self.run.metadata.name
        for attempt, run_id in self.observed.open_runs.items():
            if attempt <= st.attempt:
                rec = attempt_record(st, name, attempt)
                rec.mlflow_run_id = rec.mlflow_run_id or run_id
        report = self.observed.progress
        if report is None:
            return
        if report.attempt and report.mlflow_run_id and report.attempt <= st.attempt:
            attempt_record(st, name, report.attempt).mlflow_run_id = report.mlflow_run_id
        if report.checkpoint_uri and report.checkpoint_step is not None:
            st.last_checkpoint = CheckpointRef(
                uri=report.checkpoint_uri, step=report.checkpoint_step, time=report.checkpoint_time
            )
        # A new attempt that has logged nothing yet still stands at the checkpoint it resumes from:
        # the step never drops to 0 between attempts, and a missing value keeps the last one known.
        resumes_at = st.last_checkpoint.step if st.last_checkpoint and self.spec.checkpoint.resume == "latest" else 0
        before = st.progress or Progress()
        st.progress = Progress(
            step=max(report.step, resumes_at),
            total_steps=report.total_steps or self.spec.training.total_steps(),
            loss=report.loss if report.loss is not None else before.loss,
            tokens_per_second=report.tokens_per_second
            if report.tokens_per_second is not None
            else before.tokens_per_second,
            tokens_per_second_per_device=report.tokens_per_second_per_device
            if report.tokens_per_second_per_device is not None
            else before.tokens_per_second_per_device,
            mfu=report.mfu if report.mfu is not None else before.mfu,
            update_time=report.update_time or before.update_time,
        )

    def run_active(self, job: AttemptView) -> None:
        """An attempt that exists and has not finished."""
        nodes = self.spec.parallelism.num_nodes
        queue = self.spec.scheduling.queue_name
        if job.suspended:
            if self.pods_were_ready():
                # Kueue took the admission back (preemption): the pods are gone, and the startup
                # timeout must apply again once the Job is re-admitted.
                message = f"{job.name} was suspended again by Kueue; its pods were removed"
                self.cond("PodsReady", "False", "Suspended", message)
                self.cond("Running", "False", "Suspended", message)
            self.cond(
                "Queued",
                "True",
                "WaitingForAdmission",
                f"{job.name} waits for Kueue queue {queue!r} to admit {nodes} pods",
            )
            self.set_phase("Queued", f"attempt {job.attempt} is queued in {queue!r}")
            return
        if queue:
            self.cond("Queued", "False", "Admitted", f"admitted by Kueue queue {queue!r}")
        if self.pods_were_ready() or job.ready >= nodes:
            self.cond("PodsReady", "True", "AllPodsReady", f"{nodes}/{nodes} nodes of {job.name} ready")
            self.cond("Running", "True", "Training", f"attempt {job.attempt} is training")
            self.cond("Restarting", "False", "Running", "")
            step = f" at step {self.status.progress.step}" if self.status.progress else ""
            self.set_phase("Running", f"attempt {job.attempt} is training{step}")
            return
        started = job.start_time or job.created
        timeout = self.spec.scheduling.startup_timeout_seconds
        if started is not None and (self.observed.now - started).total_seconds() > timeout:
            # Free what the partial gang holds instead of waiting for a gang that cannot form.
            self.actions.append(DeleteAttempt(job.name))
            self.attempt_failed(job.attempt, "StartupTimeout", f"only {job.ready}/{nodes} nodes ready after {timeout}s")
            return
        restarting = any(c.type == "Restarting" and c.status == "True" for c in self.status.conditions)
        self.set_phase(
            "Restarting" if restarting else "Starting",
            self.status.message if restarting else f"attempt {job.attempt}: {job.ready}/{nodes} nodes ready",
        )

    def pods_were_ready(self) -> bool:
        return any(c.type == "PodsReady" and c.status == "True" for c in self.status.conditions)

    def finished(self, attempt: int, job: AttemptView) -> None:
        """The attempt's runtime reported an outcome."""
        if job.outcome == "Succeeded":
            self.succeed(attempt)
        elif job.reason == NON_RETRYABLE or job.exit_code in self.spec.failure_policy.non_retryable_exit_codes:
            self.attempt_failed(attempt, NON_RETRYABLE, f"exit code {job.exit_code}: {job.message}")
        elif job.reason == DEADLINE:
            self.attempt_failed(
                attempt, DEADLINE, f"spec.activeDeadlineSeconds={self.spec.active_deadline_seconds} reached"
            )
        else:
            self.attempt_failed(attempt, "AttemptFailed", job.message or job.reason)

    def step(self) -> None:
        st = self.status
        attempt = current_attempt(st, self.observed)
        job = self.observed.jobs.get(attempt)
        live = job if job is not None and not job.deleting else None
        if attempt > st.attempt:  # found an attempt the status does not know about (crash after create)
            self.adopt(attempt)

        if st.phase == "Succeeded":
            self.registration()
            return
        if st.phase == "Failed":
            return
        self.progress()
        if job is not None and job.outcome is not None:
            self.finished(attempt, job)
            return
        if self.spec.suspend:
            if live is not None:
                self.actions.append(DeleteAttempt(live.name))
                ended(st, self.run.metadata.name, live.attempt, "Killed", "Suspended")
            st.active_job_name = None
            self.cond("PodsReady", "False", "Suspended", "spec.suspend is true")
            self.cond("Running", "False", "Suspended", "spec.suspend is true")
            self.set_phase("Suspended", "suspended (checkpoints are kept); set spec.suspend: false to resume")
            return
        remaining = self.remaining_deadline()
        if remaining is not None and remaining <= 0 and st.attempt > 0:
            if live is not None:
                self.actions.append(DeleteAttempt(live.name))
                ended(st, self.run.metadata.name, live.attempt, "Failed", DEADLINE)
            self.fail(DEADLINE, f"spec.activeDeadlineSeconds={self.spec.active_deadline_seconds} reached")
            return
        if live is None:
            self.no_live_attempt(attempt)
            return
        self.run_active(live)

    def adopt(self, attempt: int) -> None:
        """Take on an attempt that was started just before a crash, before the status recorded it.

        Started from an active phase, it was a restart (its predecessor failed) and counts against
        failurePolicy.maxRestarts, or every crash in that window would refill the budget; started
        from Suspended or Pending, it was a resume, which does not count."""
        st, name = self.status, self.run.metadata.name
        if st.attempt > 0 and st.phase not in ("Suspended", "Pending"):
            before = self.observed.jobs.get(st.attempt)
            ended(st, name, st.attempt, "Failed", (before.reason if before else "") or "AttemptFailed")
            st.restart_count += attempt - st.attempt
        attempt_record(st, name, attempt)
        st.attempt, st.active_job_name = attempt, attempt_name(name, attempt)
        st.start_time = st.start_time or self.now

    def no_live_attempt(self, attempt: int) -> None:
        st = self.status
        if attempt == 0:
            self.start(
                1, phase="Queued" if self.spec.scheduling.queue_name else "Starting", message="attempt 1 is starting"
            )
        elif st.phase in ("Suspended", "Pending"):
            # Resuming after suspend (or a spec fix, or applied again locally): a fresh attempt, not a failure.
            self.cond("Restarting", "False", "Resumed", "")
            self.start(
                attempt + 1,
                phase="Starting",
                message=f"resuming: attempt {attempt + 1} starts from the latest checkpoint",
            )
        else:
            self.attempt_failed(attempt, "JobDeleted", f"{attempt_name(self.run.metadata.name, attempt)} was deleted")


def reconcile(
    run: TrainingRun | SpecError,
    *,
    status: TrainingRunStatus,
    observed: Observed,
    generation: int | None,
    run_name: str = "",
    keep_attempts: int = KEEP_ATTEMPTS,
) -> Plan:
    """Next status and actions. `run` is the parsed resource, or the SpecError its parse raised (then
    `run_name` names the run for its attempt records)."""
    status = status.model_copy(deep=True)
    now = fmt_time(observed.now)
    if isinstance(run, SpecError):
        message = "invalid spec: " + "; ".join(f"{e.path}: {e.message}" for e in run.errors)
        actions: list[Action] = []
        for j in observed.jobs.values():
            if j.outcome is None and not j.deleting:
                actions.append(DeleteAttempt(j.name))
                ended(status, run_name, j.attempt, "Killed", "InvalidSpec")
        actions += housekeeping(
            status,
            run_name,
            current=max([status.attempt, *observed.jobs]),
            open_runs=observed.open_runs,
            retained=observed.retained,
            keep=keep_attempts,
        )
        status.conditions = set_condition(
            status.conditions,
            type="Failed",
            status="True",
            reason="InvalidSpec",
            message=message,
            observed_generation=generation,
            now=now,
        )
        status.phase, status.message, status.observed_generation = "Failed", message, generation
        return Plan(status, actions)
    failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
    if (
        status.phase == "Failed"
        and failed is not None
        and failed.reason == "InvalidSpec"
        and status.observed_generation != generation
    ):
        # The spec was fixed: carry on (a new attempt resumes from the checkpoints).
        _reopen(status, reason="SpecFixed", message="spec fixed", generation=generation, now=now)
    machine = _Machine(run, status, observed, generation)
    machine.step()
    machine.status.observed_generation = generation
    tidy = housekeeping(
        machine.status,
        run.metadata.name,
        current=current_attempt(machine.status, observed),
        open_runs=observed.open_runs,
        retained=observed.retained,
        keep=keep_attempts,
    )
    actions = [*machine.actions, *tidy]
    return Plan(machine.status, actions)


def _reopen(status: TrainingRunStatus, *, reason: str, message: str, generation: int | None, now: str) -> None:
    if any(c.type == "Failed" and c.status == "True" for c in status.conditions):
        status.conditions = set_condition(
            status.conditions,
            type="Failed",
            status="False",
            reason=reason,
            message=message,
            observed_generation=generation,
            now=now,
        )
    status.phase, status.message, status.completion_time = "Pending", message, None


def resume(status: TrainingRunStatus, *, generation: int | None, now: dt.datetime) -> TrainingRunStatus:
    """A run applied again while nothing runs it (local backend: after an interruption, a failure or
    a suspend): the next reconcile starts a fresh attempt from the latest checkpoint. A succeeded run
    stays succeeded; the restart budget is not refilled."""
    status = status.model_copy(deep=True)
    if status.phase != "Succeeded":
        message = "resuming from the latest checkpoint" if status.attempt else "starting"
        _reopen(status, reason="Resumed", message=message, generation=generation, now=fmt_time(now))
    return status


def interrupted(status: TrainingRunStatus, *, generation: int | None, now: dt.datetime) -> TrainingRunStatus:
    """The process that ran the attempts vanished (local backend: its supervisor was killed or the
    machine restarted) while the run was active: nothing moves until it is applied again."""
    status = status.model_copy(deep=True)
    for rec in status.attempts:  # its MLflow run is ended FAILED once the run is applied again
        if rec.attempt == status.attempt and rec.outcome is None:
            rec.outcome, rec.reason = "Failed", "Interrupted"
    step = status.last_checkpoint.step if status.last_checkpoint else 0
    message = (
        f"attempt {status.attempt} stopped before finishing (its processes are gone); apply the "
        f"same YAML again to resume from the last checkpoint (step {step})"
    )
    stamp = fmt_time(now)
    status.conditions = set_condition(
        status.conditions,
        type="Failed",
        status="True",
        reason="Interrupted",
        message=message,
        observed_generation=generation,
        now=stamp,
    )
    status.conditions = set_condition(
        status.conditions,
        type="Running",
        status="False",
        reason="Interrupted",
        message=message,
        observed_generation=generation,
        now=stamp,
    )
    status.phase, status.message, status.active_job_name = "Failed", message, None
    status.completion_time = status.completion_time or stamp
    return status
