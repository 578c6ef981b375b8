"""`midfill apply/get/describe/logs/delete/approve/ui`: the no-cluster platform on one machine.

State lives in MIDFILL_STATE_DIR (default ./.midfill): resources, logs, run folders (checkpoints,
progress), the SQLite MLflow store with its artifacts, and the API-key files standing in for
Secrets. Training and serving run in background processes that outlive the command.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from midfill.api import KINDS, ModelRelease, SpecError, TrainingRun, load_file, normalize_kind
from midfill.lifecycle.trainingrun import SETTLED_PHASES
from midfill.local import serving, training, views
from midfill.local.state import StateStore, StoredResource
from midfill.settings import CoreSettings

TERMINAL_TR = SETTLED_PHASES


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _context() -> tuple[CoreSettings, StateStore]:
    settings = CoreSettings()
    return settings, StateStore(settings.state_dir)


def _registry(settings: CoreSettings):
    import mlflow  # noqa: F401 - configures its loggers on import; quiet them after

    from midfill.registry import Registry

    # MLflow logs its database set-up at INFO on first use; the CLI's output is ours.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return Registry(settings.resolved_tracking_uri())


def _kind(name: str) -> str:
    try:
        return normalize_kind(name)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _observe(store: StateStore, kind: str, name: str) -> StoredResource | None:
    return training.observe(store, name) if kind == "TrainingRun" else serving.observe(store, name)


def _check_models_exist(store: StateStore, settings: CoreSettings, resources: list) -> None:
    """A ModelRelease must name a model that is registered, or that a TrainingRun will register."""
    releases = [r for r in resources if isinstance(r, ModelRelease)]
    if not releases:
        return
    coming = {r.registered_model_name() for r in resources if isinstance(r, TrainingRun)}
    coming |= {training.typed_training_run(rec).registered_model_name() for rec in store.list("TrainingRun")}
    registry = _registry(settings)
    for release in releases:
        name = release.spec.model.registered_model_name
        if name not in coming and not serving.model_exists(registry, name):
            raise _fail(
                f"ModelRelease {release.metadata.name}: spec.model.registeredModelName: registered model {name!r} "
                f"does not exist in {settings.resolved_tracking_uri()} and no TrainingRun registers it; train it "
                "first (midfill apply -f <trainingrun.yaml>) or fix the name"
            )


def apply(
    file: Annotated[Path, typer.Option("-f", "--file", help="YAML with TrainingRun/ModelRelease documents.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for training to finish (progress bar) and releases to serve.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.")] = 3600.0,
) -> None:
    """Create or update resources and start their local backends (training, serving)."""
    try:
        resources = load_file(file)
    except SpecError as exc:
        prefix = f"{exc.source}: " if exc.source else ""
        for err in exc.errors:
            typer.echo(f"error: {prefix}{err.path}: {err.message}", err=True)
        typer.echo("nothing was applied", err=True)
        raise typer.Exit(1) from None
    settings, store = _context()
    _check_models_exist(store, settings, resources)
    cwd = Path.cwd()
    ok = True
    for res in resources:
        if isinstance(res, TrainingRun):
            ok &= _apply_training_run(store, settings, res, cwd=cwd, wait=wait, timeout=timeout)
        else:
            ok &= _apply_release(store, settings, res, cwd=cwd, wait=wait, timeout=timeout)
    if not ok:
        raise typer.Exit(1)


def _apply_training_run(store, settings, run: TrainingRun, *, cwd: Path, wait: bool, timeout: float) -> bool:
    name = run.metadata.name
    record, outcome = store.apply(run)
    record = training.observe(store, name)
    assert record is not None
    status = record.status()
    label = f"trainingrun.midfill.dev/{name}"
    alive = training.procs.alive(record.local.supervisor_pid, record.local.supervisor_create_time)
    if run.spec.suspend:
        # A live supervisor sees the flag on its next pass (stops the attempt, says Suspended);
        # without one, a pass of the state machine with nothing running says the same.
        if not alive:
            training.settle_without_processes(store, name)
        typer.echo(f"{label} {outcome} (suspended; set suspend: false and apply again to resume)")
        return True
    if status.phase == "Succeeded":
        note = "; the spec change is not trained (delete the run to train again)" if outcome == "configured" else ""
        typer.echo(
            f"{label} {outcome} (already succeeded: "
            f"{status.registered_model.uri if status.registered_model else '-'}){note}"
        )
        return True
    if alive:
        note = " (spec changes apply from the next attempt)" if outcome == "configured" else " (running)"
        typer.echo(f"{label} {outcome}{note}")
    else:
        why = "Launched" if status.attempt == 0 else "Resumed"
        record = training.start_attempt(store, settings, name, cwd=cwd, reason=why)
        capped = training.local_layout(run)[1]
        if capped:
            typer.echo(f"note: {capped}")
        what = f"attempt {record.status().attempt + 1} starting" + (
            ", resuming from the last checkpoint" if why == "Resumed" else ""
        )
        typer.echo(f"{label} {outcome} ({what}; logs: midfill logs {name})")
    if not wait:
        return True
    return _wait_training(store, name, timeout=timeout)


def _wait_training(store: StateStore, name: str, *, timeout: float) -> bool:
    """Show a progress bar until the run finishes; True if it succeeded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    tty = sys.stdout.isatty()
    last_line = 0.0
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        disable=not tty,
    ) as bar:
        task = bar.add_task(f"training {name}", total=None, info="starting")
        while True:
            record = training.observe(store, name)
            if record is None:
                typer.echo(f"trainingrun {name} was deleted", err=True)
                return False
            status = record.status()
            prog = status.progress
            info = status.phase
            if prog is not None:
                info = f"loss {prog.loss:.3f}" if prog.loss is not None else status.phase
                bar.update(task, completed=prog.step, total=prog.total_steps, info=info)
            if not tty and time.monotonic() - last_line > 15:
                step = f" step {prog.step}/{prog.total_steps}" if prog else ""
                loss = f" loss {prog.loss:.3f}" if prog and prog.loss is not None else ""
                typer.echo(f"  {name}: {status.phase}{step}{loss}")
                last_line = time.monotonic()
            if status.phase in TERMINAL_TR or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    if status.phase == "Succeeded":
        typer.echo(
            f"trainingrun {name} succeeded: registered "
            f"{status.registered_model.uri if status.registered_model else '-'}"
        )
        return True
    typer.echo(f"trainingrun {name}: {status.phase}: {status.message or ''}", err=True)
    return False


def _apply_release(store, settings, release: ModelRelease, *, cwd: Path, wait: bool, timeout: float) -> bool:
    name = release.metadata.name
    _, outcome = store.apply(release)
    label = f"modelrelease.midfill.dev/{name}"
    keys = serving.api_keys_file(store, release)
    if keys is not None:
        new_key = serving.ensure_api_key(keys)
        if new_key:
            typer.echo(
                f"API key for {name}, named 'default' (shown once; its digest is stored in {keys}, the stand-in "
                f"for Secret {release.spec.auth.api_key_secret_ref.name}; more: `midfill keys create NAME`): {new_key}"
            )
    record = serving.observe(store, name)
    assert record is not None
    if serving.controller_alive(record):
        typer.echo(
            f"{label} {outcome}" + (" (serving controller picks the change up)" if outcome == "configured" else "")
        )
    else:
        record = serving.start_controller(store, settings, name, cwd=cwd)
        typer.echo(f"{label} {outcome} (local Ray Serve starting; logs: midfill logs {name})")
    if not wait:
        return True
    waited = time.monotonic()
    while True:
        record = serving.observe(store, name)
        status = record.status()
        if (
            status.phase in ("Available", "Failed", "WaitingForApproval", "Degraded")
            or time.monotonic() - waited > timeout
        ):
            break
        time.sleep(1.0)
    if status.phase == "Available":
        typer.echo(f"modelrelease {name} available: {status.url} (version {status.stable_version})")
        return True
    typer.echo(f"modelrelease {name}: {status.phase}: {status.message or ''}", err=True)
    return status.phase == "WaitingForApproval"


def get(
    kind: Annotated[str, typer.Argument(help="trainingruns (tr) or modelreleases (mr).")],
    name: Annotated[str | None, typer.Argument(help="One resource (default: all).")] = None,
    output: Annotated[str | None, typer.Option("-o", "--output", help="yaml or json (default: a table).")] = None,
) -> None:
    """List resources as a table, or print them as YAML/JSON."""
    kind = _kind(kind)
    if output not in (None, "yaml", "json"):
        raise _fail(f"-o {output}: use -o yaml or -o json")
    _, store = _context()
    if name is not None:
        record = _observe(store, kind, name)
        if record is None:
            raise _fail(f"{kind.lower()} {name!r} not found (state dir {store.state_dir})")
        records = [record]
    else:
        records = [r for r in (_observe(store, kind, rec.name) for rec in store.list(kind)) if r is not None]
    if output:
        if not records:
            typer.echo(views.as_output([], output, single=False))
            return
        typer.echo(views.as_output(records, output, single=name is not None))
        return
    if not records:
        typer.echo(f"No {kind} resources found in {store.state_dir}.")
        return
    typer.echo(views.get_table(kind, records))


def describe(
    kind: Annotated[str, typer.Argument(help="trainingrun (tr) or modelrelease (mr).")],
    name: Annotated[str, typer.Argument(help="Resource name.")],
) -> None:
    """Spec summary, status, conditions and history of one resource."""
    kind = _kind(kind)
    settings, store = _context()
    record = _observe(store, kind, name)
    if record is None:
        raise _fail(f"{kind.lower()} {name!r} not found (state dir {store.state_dir})")
    info = _version_of(settings, record)
    evaluation = (info.uri, info.tags) if info else None
    typer.echo(views.describe(record, evaluation=evaluation, lineage=views.lineage_rows(info) if info else None))


def _version_of(settings: CoreSettings, record):
    """The version a TrainingRun registered or a ModelRelease resolved (best effort: a registry
    that cannot be read leaves the lineage and evaluation out rather than failing describe)."""
    status = record.status()
    if record.kind == "TrainingRun":
        ref = status.registered_model
        name, version = (ref.name, ref.version) if ref else (None, None)
    else:
        name, version = record.resource["spec"]["model"]["registeredModelName"], status.resolved_version
    if not name or not version:
        return None
    try:
        info = _registry(settings).get(name, version=version)
    except Exception:  # noqa: BLE001
        return None
    return info


def _log_files(store: StateStore, record: StoredResource) -> list[Path]:
    if record.kind == "TrainingRun":
        folder = store.logs_folder() / "trainingruns" / record.name
        attempts = sorted((p for p in folder.glob("a*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
        files = [next(iter(sorted(a.rglob("combined.log"))), None) for a in attempts]
        return [f for f in files if f is not None]
    return [Path(record.local.log_file)] if record.local.log_file else []


def logs(
    name: Annotated[str, typer.Argument(help="TrainingRun or ModelRelease name.")],
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing while it runs.")] = False,
    kind: Annotated[str | None, typer.Option("--kind", help="tr or mr, when both kinds have this name.")] = None,
) -> None:
    """Print the trainer's output (every attempt) or the serving controller's log."""
    _, store = _context()
    kinds = [_kind(kind)] if kind else list(KINDS)
    record = next((r for r in (store.get(k, name) for k in kinds) if r is not None), None)
    if record is None:
        raise _fail(f"no TrainingRun or ModelRelease named {name!r} (state dir {store.state_dir})")
    files = _log_files(store, record)
    if not files:
        typer.echo(f"no logs yet for {record.kind} {name}", err=True)
        return
    for path in files[:-1]:
        typer.echo(f"==> {path} <==")
        typer.echo(path.read_text(errors="replace"), nl=False)
    last = files[-1]
    if len(files) > 1:
        typer.echo(f"==> {last} <==")
    with open(last, errors="replace") as fh:
        while True:
            chunk = fh.read()
            if chunk:
                typer.echo(chunk, nl=False)
            if not follow:
                return
            current = store.get(record.kind, name)
            if current is None or not training.procs.alive(
                current.local.supervisor_pid, current.local.supervisor_create_time
            ):
                typer.echo(fh.read(), nl=False)
                return
            time.sleep(0.5)


def delete(
    kind: Annotated[str, typer.Argument(help="trainingrun (tr) or modelrelease (mr).")],
    name: Annotated[str, typer.Argument(help="Resource name.")],
) -> None:
    """Stop a resource's processes and forget it (registry versions and MLflow runs are kept)."""
    kind = _kind(kind)
    _, store = _context()
    if store.get(kind, name) is None:
        raise _fail(f"{kind.lower()} {name!r} not found (state dir {store.state_dir})")
    if kind == "TrainingRun":
        training.stop_run(store, name)
        import shutil

        shutil.rmtree(store.run_folder(name), ignore_errors=True)
    else:
        serving.stop_controller(store, name)
    store.delete(kind, name)
    typer.echo(f"{kind.lower()}.midfill.dev/{name} deleted (registry versions are kept)")


def approve(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Option("--version", help="Version to approve.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to point at it.")] = "champion",
    reviewer: Annotated[str | None, typer.Option("--reviewer", help="Recorded as the version's reviewer tag.")] = None,
) -> None:
    """Approve a model version: tag review=approved and move the alias (what a reviewer does in MLflow)."""
    from midfill.registry import RegistryError

    settings, _ = _context()
    try:
        info = _registry(settings).approve(model, version, alias=alias, reviewer=reviewer or os.environ.get("USER"))
    except RegistryError as exc:
        raise _fail(f"{exc}; see the versions with `midfill ui` or `midfill get tr`") from None
    typer.echo(f"approved {info.uri}: tag review=approved, alias {alias} -> version {info.version}")


def ui(
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """Run the MLflow UI on the local store (runs, metrics, registered models, approvals)."""
    settings, _ = _context()
    uri = settings.resolved_tracking_uri()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    args = [str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    typer.echo(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C to stop")
    os.execv(args[0], args)


def register(app: typer.Typer) -> None:
    """Add the local platform's commands to the `midfill` CLI."""
    app.command()(apply)
    app.command()(get)
    app.command()(describe)
    app.command()(logs)
    app.command()(delete)
    app.command()(approve)
    app.command()(ui)
    from midfill.local import keys_cli

    keys_cli.register(app)
