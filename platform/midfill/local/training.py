"""The local TrainingRun backend: torchrun through torchx's local scheduler, supervised in the background.

`start_attempt` (called by `midfill apply`) starts a detached supervisor, `python -m midfill.local
supervise-training`: an observe/act adapter around the TrainingRun state machine
(`midfill.lifecycle.trainingrun`, the one the operator uses). Every few seconds it observes its
attempts (torchx apps running `torchx.components.dist.ddp` with `-m trainer --run-file <copy of the
YAML> --uid <uid> --attempt <N>` on the `local_cwd` scheduler), the trainer's progress.json and
result.json, asks the machine what comes next, starts or cancels attempts as it says and writes the
status: restarts, spec.failurePolicy, activeDeadlineSeconds, suspend and the failure reasons are the
operator's. The trainer is started by module name, never imported here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from midfill.api import EXIT_CODE_INVALID_CONFIG, TrainingRun
from midfill.api.trainingrun import RegisteredModelRef, TrainingRunStatus
from midfill.lifecycle import trainingrun as lifecycle
from midfill.lifecycle.clock import utcnow
from midfill.lifecycle.events import phase_event
from midfill.lifecycle.trainingrun import attempt_name
from midfill.local import procs
from midfill.local.state import StateStore, StoredResource, typed_training_run
from midfill.progress import read_progress, read_result
from midfill.registry import LOOP_RETRY_SECONDS, Registry
from midfill.settings import CoreSettings

KIND = "TrainingRun"
TRAINER_MODULE = "trainer"
POLL_SECONDS = 2.0
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")


def local_layout(run: TrainingRun, cpus: int | None = None) -> tuple[int, str | None]:
    """Processes to run on this machine, and a message when the spec's nodes x processes were capped.

    All processes run on one local node; the global batch is kept (the trainer makes up the
    difference with gradient accumulation), so the result matches the spec's recipe.
    """
    cpus = cpus or os.cpu_count() or 1
    par = run.spec.parallelism
    wanted = par.world_size()
    nproc = max(1, min(wanted, cpus))
    if nproc == wanted and par.num_nodes == 1:
        return nproc, None
    return nproc, (
        f"spec.parallelism asks {par.num_nodes}x{par.nproc_per_node} = {wanted} processes; this machine "
        f"has {cpus} CPUs, so it runs 1x{nproc} locally (same global batch, more gradient accumulation)"
    )


def trainer_env(store: StateStore, settings: CoreSettings, *, nproc: int, cpus: int | None = None) -> dict[str, str]:
    """Environment of the training processes: the same state dir and MLflow store as the CLI."""
    cpus = cpus or os.cpu_count() or 1
    bin_dir = str(Path(sys.executable).parent)
    return {
        "MIDFILL_STATE_DIR": str(store.state_dir),
        "MIDFILL_TRACKING_URI": settings.resolved_tracking_uri(),
        # torchrun would otherwise set 1 thread per process with a warning; share the cores out.
        "OMP_NUM_THREADS": str(max(1, cpus // nproc)),
        # The ddp component runs `torchrun` from PATH: use this environment's.
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "MIDFILL_PROGRESS_BAR": "false",
    }


def build_app_def(*, run: TrainingRun, run_file: Path, uid: str, attempt: int, nproc: int, env: dict[str, str]):
    """The torchx AppDef: torchrun -m trainer --run-file FILE --uid UID --attempt N on 1 x nproc processes."""
    from torchx.components.dist import ddp

    # --run-file, not --run: torchrun parses its script's arguments too, and `--run` is an
    # ambiguous prefix of its own --run-path.
    return ddp(
        "--run-file",
        str(run_file),
        "--uid",
        uid,
        "--attempt",
        str(attempt),
        m=TRAINER_MODULE,
        name=f"{run.metadata.name}-a{attempt}",
        j=f"1x{nproc}",
        cpu=nproc,
        env=env,
        max_retries=0,  # restarts are ours (spec.failurePolicy), each one a new attempt
    )


def write_run_file(store: StateStore, record: StoredResource) -> Path:
    """The copy of the applied YAML the trainer reads (with the uid the store assigned)."""
    wire = {k: v for k, v in record.resource.items() if k != "status"}
    path = store.run_folder(record.name) / "trainingrun.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(wire, sort_keys=False))
    os.replace(tmp, path)
    return path


# -- the CLI side -----------------------------------------------------------------------------------
def is_active(record: StoredResource) -> bool:
    """Whether a supervisor should be running this run (a suspended run has none)."""
    return lifecycle.wants_processes(record.status().phase)


def observe(store: StateStore, name: str) -> StoredResource | None:
    """The record, with an active run whose supervisor has vanished marked as interrupted."""
    record = store.get(KIND, name)
    if (
        record is None
        or record.local.supervisor_pid is None
        or not is_active(record)
        or procs.alive(record.local.supervisor_pid, record.local.supervisor_create_time)
    ):
        return record

    def mark(rec: StoredResource) -> None:
        if not is_active(rec) or procs.alive(rec.local.supervisor_pid, rec.local.supervisor_create_time):
            return
        _write(
            rec, lifecycle.interrupted(rec.status(), generation=rec.resource["metadata"]["generation"], now=utcnow())
        )

    return store.update(KIND, name, mark)


def settle_without_processes(store: StateStore, name: str) -> StoredResource | None:
    """One pass of the state machine for a run nothing runs (e.g. suspended while no supervisor was
    alive): the status it reaches without starting anything."""

    def change(rec: StoredResource) -> None:
        plan = lifecycle.reconcile(
            typed_training_run(rec),
            status=rec.status(),
            observed=lifecycle.Observed(now=utcnow()),
            generation=rec.resource["metadata"]["generation"],
        )
        if not plan.actions:
            _write(rec, plan.status)

    return store.update(KIND, name, change)


def start_attempt(store: StateStore, settings: CoreSettings, name: str, *, cwd: Path, reason: str) -> StoredResource:
    """Start the run's supervisor in the background (it starts the next attempt); the updated record."""

    def change(rec: StoredResource) -> None:
        if procs.alive(rec.local.supervisor_pid, rec.local.supervisor_create_time):
            return  # someone else started it meanwhile
        # Leftover workers of an earlier attempt (supervisor killed hard) would fight over the
        # checkpoint folder: stop them first.
        procs.stop(None, None, pgids=rec.local.child_pgids, timeout=10)
        run = typed_training_run(rec)
        nproc, capped = local_layout(run)
        _write(rec, lifecycle.resume(rec.status(), generation=rec.resource["metadata"]["generation"], now=utcnow()))
        if capped:
            rec.add_event("ProcessesCapped", capped, type="Warning")
        rec.add_event(reason, f"supervisor starting (1x{nproc} processes)")
        run_file = write_run_file(store, rec)
        logs = store.logs_folder() / "trainingruns" / name
        rec.local.run_file = str(run_file)
        rec.local.layout = f"1x{nproc}"
        rec.local.supervisor_log = str(logs / "supervisor.log")
        rec.local.log_file = None
        rec.local.child_pgids = []
        rec.local.stop_requested = False
        pid, ctime = procs.spawn_backend(
            "supervise-training",
            name=name,
            state_dir=store.state_dir,
            tracking_uri=settings.resolved_tracking_uri(),
            log_file=logs / "supervisor.log",
            cwd=cwd,
        )
        rec.local.supervisor_pid, rec.local.supervisor_create_time = pid, ctime

    record = store.update(KIND, name, change)
    assert record is not None, f"TrainingRun {name} vanished"
    return record


def stop_run(store: StateStore, name: str) -> None:
    """Stop the supervisor and the workers of a run (checkpoints and registry versions stay)."""
    record = store.update(KIND, name, lambda rec: setattr(rec.local, "stop_requested", True))
    if record is None:
        return
    procs.stop(record.local.supervisor_pid, record.local.supervisor_create_time, pgids=record.local.child_pgids)


def _write(rec: StoredResource, status: TrainingRunStatus) -> None:
    """Set the status, with the event its phase change calls for (as the operator emits it)."""
    event = phase_event(rec.status().phase, status.phase, status.message)
    rec.set_status(status)
    if event is not None:
        rec.add_event(event.reason, event.message, type=event.type)


# -- the supervisor (a background process): an observe/act adapter around midfill.lifecycle ---------
@dataclass
class _Attempt:
    """One attempt this supervisor started: a torchx app, or a config check that refused to start."""

    number: int
    log_dir: Path
    created: dt.datetime
    handle: str | None = None
    outcome: str | None = None
    exit_code: int | None = None
    message: str = ""
    deleting: bool = False


class _Supervisor:
    def __init__(self, store: StateStore, name: str) -> None:
        from torchx.runner import get_runner

        self.store, self.name = store, name
        self.settings = CoreSettings(state_dir=store.state_dir)
        self.runner = get_runner()
        self.attempts: dict[int, _Attempt] = {}
        self.stop = False
        self._registry: Registry | None = None

    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.settings.resolved_tracking_uri(), retry_seconds=LOOP_RETRY_SECONDS)
        return self._registry

    def open_runs(self, record: StoredResource, run: TrainingRun) -> dict[int, str]:
        """MLflow runs of this TrainingRun still RUNNING, asked only once some attempt is over."""
        status = record.status()
        over = any(r.outcome in ("Failed", "Killed") for r in status.attempts) or any(
            a.outcome is not None or a.deleting for a in self.attempts.values()
        )
        if not over:
            return {}
        try:
            return self.registry().open_attempt_runs(
                record.resource["metadata"]["uid"], experiment_name=run.spec.registry.experiment_name
            )
        except Exception as exc:  # MLflow unreadable: ended on a later pass
            print(f"MLflow not readable: {exc}", flush=True)
            return {}

    def on_term(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.stop = True

    def view(self, att: _Attempt, run: TrainingRun) -> lifecycle.AttemptView:
        from torchx.specs import AppState

        if att.outcome is None and att.handle is not None and not att.deleting:
            app = self.runner.status(att.handle)
            state = app.state if app else AppState.UNKNOWN
            if state == AppState.SUCCEEDED:
                att.outcome = "Succeeded"
            elif state in (AppState.FAILED, AppState.CANCELLED, AppState.UNKNOWN):
                att.outcome, att.exit_code = "Failed", _exit_code(att.log_dir)
                att.message = (
                    f"exit code {att.exit_code if att.exit_code is not None else 'unknown'}; see "
                    f"`midfill logs {self.name}`"
                )
            elif state == AppState.RUNNING:
                return lifecycle.AttemptView(
                    att.number,
                    attempt_name(self.name, att.number),
                    created=att.created,
                    ready=run.spec.parallelism.num_nodes,
                )  # all local "nodes" run together
        return lifecycle.AttemptView(
            att.number,
            attempt_name(self.name, att.number),
            created=att.created,
            outcome=att.outcome,
            exit_code=att.exit_code,
            message=att.message,  # type: ignore[arg-type]
            deleting=att.deleting,
        )

    def observe(self, record: StoredResource, run: TrainingRun) -> lifecycle.Observed:
        status = record.status()
        jobs = {n: self.view(a, run) for n, a in self.attempts.items()}
        observed = lifecycle.Observed(
            now=utcnow(),
            jobs=jobs,
            progress=read_progress(self.store.run_folder(self.name)),
            open_runs=self.open_runs(record, run),
        )
        if not lifecycle.needs_registry_lookup(status, observed):
            return observed
        result = read_result(self.store.run_folder(self.name))
        if result is not None:
            ref = RegisteredModelRef(name=result.registered_model_name, version=result.version, uri=result.uri)
        else:  # no result.json (crashed after registering): the registry knows the run's uid
            try:
                found = self.registry().find_by_run_uid(run.registered_model_name(), record.resource["metadata"]["uid"])
            except Exception as exc:  # MLflow unreadable: the status says the version is not found yet
                print(f"MLflow not readable: {exc}", flush=True)
                found = None
            ref = RegisteredModelRef(name=found.name, version=found.version, uri=found.uri) if found else None
        return lifecycle.Observed(
            now=observed.now, jobs=jobs, progress=observed.progress, registered=ref, open_runs=observed.open_runs
        )

    def act(self, record: StoredResource, run: TrainingRun, actions: list) -> None:
        for action in actions:
            if isinstance(action, lifecycle.DeleteAttempt):
                for att in self.attempts.values():
                    if attempt_name(self.name, att.number) == action.name and att.handle and not att.deleting:
                        self.runner.cancel(att.handle)
                        att.deleting = True
            elif isinstance(action, lifecycle.EndRun):
                self.end_run(action.run_id, action.status)
            elif isinstance(action, lifecycle.StartAttempt):
                self.start(record, run, action.attempt)
            # PruneAttempt: nothing to delete here (no Jobs or ConfigMaps; the logs of every attempt stay)

    def end_run(self, run_id: str, status: str) -> None:
        try:
            if self.registry().end_run(run_id, status):
                print(f"ended MLflow run {run_id} as {status}", flush=True)
        except Exception as exc:  # MLflow unreadable: the machine asks again on a later pass
            print(f"could not end MLflow run {run_id}: {exc}", flush=True)

    def start(self, record: StoredResource, run: TrainingRun, number: int) -> None:
        log_dir = self.store.logs_folder() / "trainingruns" / self.name / f"a{number}"
        att = self.attempts[number] = _Attempt(number, log_dir, utcnow())
        problem = _check_config(self.store, self.settings, record, number)
        if problem is not None:  # what a Pod failure policy does on a cluster: exit 78 ends the attempt
            att.outcome, att.exit_code, att.message = "Failed", EXIT_CODE_INVALID_CONFIG, problem
            return
        nproc, _ = local_layout(run)
        app = build_app_def(
            run=run,
            run_file=Path(record.local.run_file or write_run_file(self.store, record)),
            uid=record.resource["metadata"]["uid"],
            attempt=number,
            nproc=nproc,
            env=trainer_env(self.store, self.settings, nproc=nproc),
        )
        att.handle = self.runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(log_dir)})
        # torchx installs its own SIGTERM handler when the scheduler is created; ours stops cleanly.
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        self.store.update(
            KIND,
            self.name,
            lambda rec: rec.add_event(
                "Started",
                f"attempt {number}: torchrun -m {TRAINER_MODULE} on 1x{nproc} processes (torchx local_cwd "
                f"{att.handle})",
            ),
        )

    def live(self) -> list[_Attempt]:
        return [a for a in self.attempts.values() if a.handle and a.outcome is None and not a.deleting]

    def cancel_all(self, record: StoredResource | None) -> None:
        """Stop the live attempts (`midfill delete`, or this supervisor told to stop): their MLflow runs
        end KILLED, as the operator ends the run of a Job it deleted."""
        live = self.live()
        for att in live:
            self.runner.cancel(att.handle)
            att.deleting = True
        if live and record is not None:
            uid, experiment = record.resource["metadata"]["uid"], typed_training_run(record).spec.registry
            try:
                runs = self.registry().open_attempt_runs(uid, experiment_name=experiment.experiment_name)
            except Exception as exc:
                print(f"MLflow not readable: {exc}", flush=True)
                return
            for att in live:
                if att.number in runs:
                    self.end_run(runs[att.number], "KILLED")

    def pass_once(self) -> bool:
        """Observe, reconcile, act, write; whether there is more to supervise."""
        record = self.store.get(KIND, self.name)
        if record is None or record.local.stop_requested or self.stop:
            self.cancel_all(record)
            return False
        run = typed_training_run(record)
        plan = lifecycle.reconcile(
            run,
            status=record.status(),
            observed=self.observe(record, run),
            generation=record.resource["metadata"]["generation"],
        )
        self.act(record, run, plan.actions)
        # torchrun starts its workers in sessions of their own: keep their groups on record so
        # `delete` (or the next attempt) can stop them even if this supervisor is killed.
        groups = _worker_groups(psutil.Process())
        logs = sorted(
            (self.store.logs_folder() / "trainingruns" / self.name / f"a{plan.status.attempt}").rglob("combined.log")
        )

        def change(rec: StoredResource) -> None:
            rec.local.child_pgids = sorted(set(rec.local.child_pgids) | set(groups))
            rec.local.log_file = str(logs[0]) if logs else rec.local.log_file
            _write(rec, plan.status)

        self.store.update(KIND, self.name, change)
        return bool(self.live()) or lifecycle.wants_processes(plan.status.phase)


def supervise(state_dir: Path, name: str) -> int:
    """Run the attempts of a TrainingRun until it succeeds, fails for good, is suspended or stopped."""
    store = StateStore(state_dir)
    if store.get(KIND, name) is None:
        return 0
    sup = _Supervisor(store, name)
    signal.signal(signal.SIGTERM, sup.on_term)
    signal.signal(signal.SIGINT, sup.on_term)
    while sup.pass_once():
        time.sleep(POLL_SECONDS)
    record = store.get(KIND, name)
    return 0 if record is None or record.status().phase != "Failed" else 1


def _exit_code(log_dir: Path) -> int | None:
    """The trainer's exit code: torchrun reports the failed worker's in its summary, else its own."""
    codes: list[int] = []
    returncode = None
    for path in log_dir.rglob("SUCCESS"):  # torchx's record of the finished app: exit code per replica
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            replicas = json.loads(path.read_text())["roles"]
            returncode = next((r["exitcode"] for role in replicas.values() for r in role if r["exitcode"]), returncode)
    for path in sorted(log_dir.rglob("*.log")):
        try:
            codes += [int(c) for c in _EXITCODE.findall(path.read_text(errors="replace"))]
        except OSError:
            continue
    nonzero = [c for c in codes if c != 0]
    return nonzero[-1] if nonzero else returncode


def _check_config(store: StateStore, settings: CoreSettings, record: StoredResource, attempt: int) -> str | None:
    """`python -m trainer --check` before torchrun (which turns the trainer's exit 78 into 1).

    Returns the trainer's one-line reason when the config cannot run, else None.
    """
    run = typed_training_run(record)
    nproc, _ = local_layout(run)
    run_file = record.local.run_file or str(write_run_file(store, record))
    args = [
        sys.executable,
        "-m",
        TRAINER_MODULE,
        "--run-file",
        run_file,
        "--uid",
        record.resource["metadata"]["uid"],
        "--attempt",
        str(attempt),
        "--check",
    ]
    env = {**os.environ, **trainer_env(store, settings, nproc=nproc)}
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout + proc.stderr)
    sys.stdout.flush()
    if proc.returncode != EXIT_CODE_INVALID_CONFIG:
        return None  # fine, or a crash the real attempt will report (and retry)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "invalid config" in line), lines[-1] if lines else "")
    return reason.strip()


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def _worker_groups(me) -> list[int]:
    """Process groups led by this supervisor's descendants (torchrun replicas and their workers)."""
    try:
        return sorted(c.pid for c in me.children(recursive=True) if _is_group_leader(c.pid))
    except psutil.Error:
        return []
