"""The local TrainingRun backend: torchrun through torchx's local scheduler, supervised in the background.

`start_attempt` (called by `midfill apply`) records the attempt and starts a detached supervisor,
`python -m midfill.local supervise-training`, which submits `torchx.components.dist.ddp` running
`-m trainer --run-file <copy of the YAML> --uid <uid> --attempt <N>` to the `local_cwd` scheduler, mirrors
the trainer's progress.json/result.json into the resource's status, and restarts failed attempts as
spec.failurePolicy says (each restart resumes from the newest checkpoint). The trainer is started
by module name, never imported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from midfill.api import EXIT_CODE_INVALID_CONFIG, TrainingRun, get_condition, now_rfc3339, set_condition
from midfill.api.trainingrun import CheckpointRef, Progress, RegisteredModelRef, TrainingRunStatus
from midfill.local import procs
from midfill.local.state import StateStore, StoredResource, typed_training_run
from midfill.progress import read_progress, read_result
from midfill.settings import CoreSettings

KIND = "TrainingRun"
TRAINER_MODULE = "trainer"
ACTIVE_PHASES = ("Pending", "Queued", "Starting", "Running", "Restarting")
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
        "--run-file", str(run_file), "--uid", uid, "--attempt", str(attempt),
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
    return record.status().phase in ACTIVE_PHASES


def observe(store: StateStore, name: str) -> StoredResource | None:
    """The record, with an active run whose supervisor has vanished marked as interrupted."""
    record = store.get(KIND, name)
    if record is None or record.local.supervisor_pid is None or not is_active(record) or procs.alive(record.local.supervisor_pid, record.local.supervisor_create_time):
        return record

    def mark(rec: StoredResource) -> None:
        if not is_active(rec) or procs.alive(rec.local.supervisor_pid, rec.local.supervisor_create_time):
            return
        status = rec.status()
        step = status.last_checkpoint.step if status.last_checkpoint else 0
        message = (
            f"attempt {status.attempt} stopped before finishing (its processes are gone); apply the "
            f"same YAML again to resume from the last checkpoint (step {step})"
        )
        _finish(status, phase="Failed", reason="Interrupted", message=message, generation=rec.resource["metadata"]["generation"])
        rec.set_status(status)
        rec.add_event("Interrupted", message, type="Warning")

    return store.update(KIND, name, mark)


def start_attempt(store: StateStore, settings: CoreSettings, name: str, *, cwd: Path, reason: str) -> StoredResource:
    """Start the next attempt of a run in a detached supervisor; returns the updated record."""
    def change(rec: StoredResource) -> None:
        if procs.alive(rec.local.supervisor_pid, rec.local.supervisor_create_time):
            return  # someone else started it meanwhile
        # Leftover workers of an earlier attempt (supervisor killed hard) would fight over the
        # checkpoint folder: stop them first.
        procs.stop(None, None, pgids=rec.local.child_pgids, timeout=10)
        run = typed_training_run(rec)
        status = rec.status()
        attempt = status.attempt + 1
        nproc, capped = local_layout(run)
        status.phase = "Starting"
        status.message = f"starting attempt {attempt} (1x{nproc} processes)"
        status.attempt = attempt
        status.restart_count = max(0, attempt - 1)
        status.active_job_name = f"{name}-a{attempt}"
        status.start_time = status.start_time or now_rfc3339()
        status.completion_time = None
        gen = rec.resource["metadata"]["generation"]
        status.observed_generation = gen
        status.conditions = set_condition(status.conditions, type="PodsReady", status="False", reason="Starting", message=status.message, observed_generation=gen)
        status.conditions = set_condition(status.conditions, type="Running", status="False", reason="Starting", message=status.message, observed_generation=gen)
        if get_condition(status.conditions, "Failed"):
            status.conditions = set_condition(status.conditions, type="Failed", status="False", reason="Restarted", message=f"attempt {attempt} started", observed_generation=gen)
        rec.set_status(status)
        if capped:
            rec.add_event("ProcessesCapped", capped, type="Warning")
        rec.add_event(reason, status.message)
        run_file = write_run_file(store, rec)
        logs = store.logs_folder() / "trainingruns" / name
        rec.local.run_file = str(run_file)
        rec.local.layout = f"1x{nproc}"
        rec.local.supervisor_log = str(logs / "supervisor.log")
        rec.local.log_file = None
        rec.local.child_pgids = []
        rec.local.stop_requested = False
        pid, ctime = procs.spawn_detached(
            procs.python_module_args("midfill.local", "supervise-training", "--state-dir", str(store.state_dir), "--name", name, "--attempt", str(attempt)),
            log_file=logs / "supervisor.log",
            env={**os.environ, "MIDFILL_STATE_DIR": str(store.state_dir), "MIDFILL_TRACKING_URI": settings.resolved_tracking_uri()},
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


# -- the supervisor (a background process) ---------------------------------------------------------
def _finish(status: TrainingRunStatus, *, phase: str, reason: str, message: str, generation: int | None) -> None:
    status.phase = phase  # type: ignore[assignment]
    status.message = message
    status.active_job_name = None
    status.completion_time = now_rfc3339()
    ok = phase == "Succeeded"
    status.conditions = set_condition(status.conditions, type="Running", status="False", reason=reason, message=message, observed_generation=generation)
    status.conditions = set_condition(status.conditions, type="Succeeded" if ok else "Failed", status="True", reason=reason, message=message, observed_generation=generation)


def _mirror_progress(status: TrainingRunStatus, run_folder: Path) -> None:
    prog = read_progress(run_folder)
    if prog is None:
        return
    status.progress = Progress(step=prog.step, total_steps=prog.total_steps, loss=prog.loss, tokens_per_second=prog.tokens_per_second, update_time=prog.update_time)
    if prog.checkpoint_uri and prog.checkpoint_step is not None:
        status.last_checkpoint = CheckpointRef(uri=prog.checkpoint_uri, step=prog.checkpoint_step, time=prog.checkpoint_time)


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


def supervise(state_dir: Path, name: str, attempt: int) -> int:
    """Run attempts of a TrainingRun until it succeeds, fails for good, or is stopped."""
    from torchx.runner import get_runner
    from torchx.specs import AppState

    store = StateStore(state_dir)
    settings = CoreSettings(state_dir=store.state_dir)
    stop = {"requested": False}

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        stop["requested"] = True

    first = store.get(KIND, name)
    if first is None:
        return 0
    problem = _check_config(store, settings, first, attempt)
    if problem is not None:
        gen = first.resource["metadata"]["generation"]
        store.update(KIND, name, lambda rec: _failed(rec, "InvalidConfig", problem, gen))
        return 1
    runner = get_runner()
    while True:
        record = store.get(KIND, name)
        if record is None:
            return 0
        run = typed_training_run(record)
        gen = record.resource["metadata"]["generation"]
        nproc, _ = local_layout(run)
        log_dir = store.logs_folder() / "trainingruns" / name / f"a{attempt}"
        app = build_app_def(
            run=run, run_file=Path(record.local.run_file or write_run_file(store, record)), uid=record.resource["metadata"]["uid"],
            attempt=attempt, nproc=nproc, env=trainer_env(store, settings, nproc=nproc),
        )
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(log_dir)})
        # torchx installs its own SIGTERM handler when the scheduler is created; ours stops cleanly.
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        import psutil

        me = psutil.Process()
        pgids = _worker_groups(me)

        def running(rec: StoredResource) -> None:
            rec.local.child_pgids = pgids
            logs = sorted(log_dir.rglob("combined.log"))
            rec.local.log_file = str(logs[0]) if logs else None
            status = rec.status()
            status.phase = "Running"
            status.message = f"attempt {attempt} is training (1x{nproc} local processes)"
            status.conditions = set_condition(status.conditions, type="PodsReady", status="True", reason="AllPodsReady", message=f"1x{nproc} local processes started", observed_generation=gen)
            status.conditions = set_condition(status.conditions, type="Running", status="True", reason="Training", message=status.message, observed_generation=gen)
            status.conditions = set_condition(status.conditions, type="Restarting", status="False", reason="Running", message="", observed_generation=gen)
            rec.set_status(status)
            rec.add_event("Started", f"attempt {attempt}: torchrun -m {TRAINER_MODULE} on 1x{nproc} processes (torchx local_cwd {handle})")

        store.update(KIND, name, running)
        state = None
        while True:
            app_status = runner.status(handle)
            state = app_status.state if app_status else AppState.UNKNOWN
            # torchrun starts its workers in sessions of their own: keep their groups on record so
            # `delete` (or the next attempt) can stop them even if this supervisor is killed.
            groups = _worker_groups(me)
            store.update(KIND, name, lambda rec: _set_progress(rec, store, groups=groups))
            if state in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED, AppState.UNKNOWN) or stop["requested"]:
                break
            time.sleep(POLL_SECONDS)
        if stop["requested"]:
            runner.cancel(handle)
            store.update(KIND, name, lambda rec: _stopped(rec, attempt))
            return 0
        store.update(KIND, name, lambda rec: _set_progress(rec, store))
        if state == AppState.SUCCEEDED:
            result = read_result(store.run_folder(name))
            if result is None:
                code: int | None = None
                why = "the trainer exited 0 but wrote no result.json"
            else:
                store.update(KIND, name, lambda rec: _succeeded(rec, result, gen))
                return 0
        else:
            code = _exit_code(log_dir)
            why = f"attempt {attempt} failed (exit code {code if code is not None else 'unknown'}); see `midfill logs {name}`"
        policy = run.spec.failure_policy
        retry = code not in policy.non_retryable_exit_codes and attempt <= policy.max_restarts
        if not retry:
            reason = "InvalidConfig" if code in policy.non_retryable_exit_codes else "BackoffLimitExceeded" if attempt > policy.max_restarts else "AttemptFailed"
            store.update(KIND, name, lambda rec: _failed(rec, reason, why, gen))
            return 1
        attempt += 1
        store.update(KIND, name, lambda rec: _restarting(rec, attempt, why, gen))


def _check_config(store: StateStore, settings: CoreSettings, record: StoredResource, attempt: int) -> str | None:
    """`python -m trainer --check` before torchrun (which turns the trainer's exit 78 into 1).

    Returns the trainer's one-line reason when the config cannot run, else None.
    """
    run = typed_training_run(record)
    nproc, _ = local_layout(run)
    run_file = record.local.run_file or str(write_run_file(store, record))
    args = [sys.executable, "-m", TRAINER_MODULE, "--run-file", run_file, "--uid", record.resource["metadata"]["uid"], "--attempt", str(attempt), "--check"]
    env = {**os.environ, **trainer_env(store, settings, nproc=nproc)}
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout + proc.stderr)
    sys.stdout.flush()
    if proc.returncode != EXIT_CODE_INVALID_CONFIG:
        return None  # fine, or a crash the real attempt will report (and retry)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "invalid config" in line), lines[-1] if lines else "")
    return f"{reason.strip()} (exit {EXIT_CODE_INVALID_CONFIG}: not retried; fix the spec and apply again)"


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def _worker_groups(me) -> list[int]:
    """Process groups led by this supervisor's descendants (torchrun replicas and their workers)."""
    import psutil

    try:
        return sorted(c.pid for c in me.children(recursive=True) if _is_group_leader(c.pid))
    except psutil.Error:
        return []


def _set_progress(rec: StoredResource, store: StateStore, *, groups: list[int] | None = None) -> None:
    if groups:
        rec.local.child_pgids = sorted(set(rec.local.child_pgids) | set(groups))
    status = rec.status()
    _mirror_progress(status, store.run_folder(rec.name))
    rec.set_status(status)


def _succeeded(rec: StoredResource, result, gen: int) -> None:
    status = rec.status()
    status.registered_model = RegisteredModelRef(name=result.registered_model_name, version=result.version, uri=result.uri)
    message = f"trained and registered {result.uri}"
    _finish(status, phase="Succeeded", reason="JobComplete", message=message, generation=gen)
    status.conditions = set_condition(status.conditions, type="Running", status="False", reason="Completed", message=message, observed_generation=gen)
    status.conditions = set_condition(status.conditions, type="Restarting", status="False", reason="Completed", message="", observed_generation=gen)
    status.conditions = set_condition(status.conditions, type="ModelRegistered", status="True", reason="Registered", message=result.uri, observed_generation=gen)
    rec.set_status(status)
    rec.add_event("ModelRegistered", message)


def _failed(rec: StoredResource, reason: str, message: str, gen: int) -> None:
    status = rec.status()
    _finish(status, phase="Failed", reason=reason, message=message, generation=gen)
    rec.set_status(status)
    rec.add_event(reason, message, type="Warning")


def _restarting(rec: StoredResource, attempt: int, why: str, gen: int) -> None:
    status = rec.status()
    status.phase = "Restarting"
    status.attempt = attempt
    status.restart_count += 1
    status.active_job_name = f"{rec.name}-a{attempt}"
    status.message = f"{why}; restarting as attempt {attempt} from the last checkpoint"
    status.conditions = set_condition(status.conditions, type="Restarting", status="True", reason="AttemptFailed", message=status.message, observed_generation=gen)
    rec.set_status(status)
    rec.add_event("Restarting", status.message, type="Warning")


def _stopped(rec: StoredResource, attempt: int) -> None:
    status = rec.status()
    message = f"attempt {attempt} stopped on request"
    _finish(status, phase="Failed", reason="Stopped", message=message, generation=rec.resource["metadata"]["generation"])
    rec.set_status(status)
    rec.add_event("Stopped", message, type="Warning")
