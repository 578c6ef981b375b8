"""The local ModelRelease backend: a release controller with its own local Ray and Ray Serve.

`start_controller` (called by `midfill apply`) starts `python -m midfill.local control-release` in the
background. The controller owns a private local Ray cluster (like the RayService a release gets on
a cluster), started by `ray.init` in a short temp folder with no dashboard and a small object store,
and Serve's HTTP proxy on 127.0.0.1 at a free port kept in the resource (the URL stays the same when
the controller is restarted). Every few seconds it resolves the release's alias or version in the
registry, checks approval (`midfill.registry.unmet_approval`; the status says what it waits for), and
`serve.run`s the app `serving.app:build_app` — found by its import path, never imported here — with
`ServeArgs.for_release(...)` pinned to the approved version. A newer approved version is rolled out
by `serve.run` with new args: Serve starts the new replica before it stops the old one, and the old
one finishes its requests, so none are dropped. Stopping the controller (`midfill delete`) shuts Serve
and its Ray down; Ray's processes share the controller's fate if it dies.

API keys: `spec.auth.apiKeySecretRef {name, key}` maps to the file `<state dir>/secrets/<name>/<key>`
(named keys stored as digests, midfill.apikeys; mode 0600): a key named `default` is generated on
first use and `midfill apply` prints it once; `midfill keys` adds and revokes others.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from midfill.api import ModelRelease, set_condition
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.local import procs
from midfill.local.state import StateStore, StoredResource, typed_model_release
from midfill.registry import Registry, RegistryError, VersionInfo, approval_reason, unmet_approval
from midfill.serve_args import ServeArgs
from midfill.settings import CoreSettings

KIND = "ModelRelease"
APP_IMPORT_PATH = "serving.app:build_app"
POLL_SECONDS = 3.0
# Ray's CPUs are bookkeeping: replicas share the machine's real cores, so the local Ray declares
# plenty, leaving room for a rolling swap (old and new replica side by side) and autoscaling. A
# replica's request is capped at the real cores (it also sets the replica's torch threads).
LOGICAL_CPUS_MIN = 16


# -- API keys ---------------------------------------------------------------------------------------
def api_keys_file(store: StateStore, release: ModelRelease) -> Path | None:
    """The file standing in for the release's Secret (None when auth is disabled)."""
    ref = release.spec.auth.api_key_secret_ref
    if ref is None:
        return None
    return store.state_dir / "secrets" / ref.name / ref.key


def ensure_api_key(path: Path) -> str | None:
    """Create the key file with a fresh key named `default` if it holds no key; returns the new
    key (stored only as its digest, midfill.apikeys), else None."""
    from midfill.apikeys import KeyFile

    if KeyFile(path).keys():
        return None
    return KeyFile(path).create("default")


# -- registry checks --------------------------------------------------------------------------------
def resolve(registry: Registry, release: ModelRelease) -> VersionInfo:
    """The version the release points at now (RegistryError naming what is missing)."""
    ref = release.spec.model
    if ref.version is not None:
        return registry.get(ref.registered_model_name, version=ref.version)
    return registry.get(ref.registered_model_name, alias=ref.effective_alias())


def model_exists(registry: Registry, name: str) -> bool:
    try:
        registry.client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - mlflow raises MlflowException for "not found"
        return False
    return True


# -- the CLI side -----------------------------------------------------------------------------------
def controller_alive(record: StoredResource) -> bool:
    return procs.alive(record.local.supervisor_pid, record.local.supervisor_create_time)


def observe(store: StateStore, name: str) -> StoredResource | None:
    """The record; a release whose controller is gone is marked Degraded (its endpoint is down)."""
    record = store.get(KIND, name)
    if record is None or record.local.supervisor_pid is None or controller_alive(record):
        return record
    if record.status().phase == "Degraded" and record.status().url is None:
        return record  # already marked

    def mark(rec: StoredResource) -> None:
        if controller_alive(rec) or rec.local.supervisor_pid is None:
            return
        status = rec.status()
        message = "the local serving process is not running; apply the same YAML again to restart it"
        status.phase = "Degraded"
        status.message = message
        status.url = None
        gen = rec.resource["metadata"]["generation"]
        status.conditions = set_condition(status.conditions, type="Available", status="False", reason="ControllerStopped", message=message, observed_generation=gen)
        rec.set_status(status)
        rec.add_event("ControllerStopped", message, type="Warning")

    return store.update(KIND, name, mark)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_controller(store: StateStore, settings: CoreSettings, name: str, *, cwd: Path) -> StoredResource:
    """Start the release controller in the background (unless it already runs)."""
    def change(rec: StoredResource) -> None:
        if controller_alive(rec):
            return
        release = typed_model_release(rec)
        keys = api_keys_file(store, release)
        rec.local.api_keys_file = str(keys) if keys else None
        logs = store.logs_folder() / "modelreleases" / name
        rec.local.supervisor_log = str(logs / "controller.log")
        rec.local.log_file = rec.local.supervisor_log
        rec.local.stop_requested = False
        status = rec.status()
        status.phase = "Pending" if status.stable_version is None else "Progressing"
        status.message = "starting the local Ray Serve controller"
        rec.set_status(status)
        rec.add_event("ControllerStarting", f"local Ray Serve controller starting (log {rec.local.supervisor_log})")
        pid, ctime = procs.spawn_detached(
            procs.python_module_args("midfill.local", "control-release", "--state-dir", str(store.state_dir), "--name", name),
            log_file=logs / "controller.log",
            env={**os.environ, "MIDFILL_STATE_DIR": str(store.state_dir), "MIDFILL_TRACKING_URI": settings.resolved_tracking_uri()},
            cwd=cwd,
        )
        rec.local.supervisor_pid, rec.local.supervisor_create_time = pid, ctime

    record = store.update(KIND, name, change)
    assert record is not None
    return record


def stop_controller(store: StateStore, name: str) -> None:
    record = store.update(KIND, name, lambda rec: setattr(rec.local, "stop_requested", True))
    if record is not None:
        procs.stop(record.local.supervisor_pid, record.local.supervisor_create_time, timeout=30)


# -- the controller (a background process) ----------------------------------------------------------
def _ray_temp_dir(state_dir: Path, name: str) -> str:
    # Ray's unix sockets live under the temp dir and must stay under ~107 characters: a short
    # folder in /tmp, private to this state dir and release.
    digest = hashlib.sha1(f"{state_dir}/{name}".encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"mfray-{digest}")


def local_serve_args(release: ModelRelease, *, version: VersionInfo, tracking_uri: str, keys: str | None) -> ServeArgs:
    """ServeArgs for the release pinned to one version, with CPU requests fitted to this machine."""
    args = ServeArgs.for_release(release, model_uri=version.uri, tracking_uri=tracking_uri, api_keys_file=keys)
    cpus = float(os.cpu_count() or 1)
    return args.model_copy(update={"num_cpus": min(args.num_cpus, cpus), "num_gpus": 0.0})


def control(state_dir: Path, name: str) -> int:
    """Serve a ModelRelease until it is deleted: follow approvals and roll new versions out."""
    import ray
    from ray import serve
    from ray._common.utils import import_attr

    store = StateStore(state_dir)
    settings = CoreSettings(state_dir=store.state_dir)
    tracking_uri = settings.resolved_tracking_uri()
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))

    record = store.get(KIND, name)
    if record is None:
        return 0
    port = _port_from_url(record.resource.get("status", {}).get("url")) or free_port()
    cpus = os.cpu_count() or 1
    ray.init(
        _temp_dir=_ray_temp_dir(store.state_dir, name),
        include_dashboard=False,
        num_cpus=max(LOGICAL_CPUS_MIN, 8 * cpus),
        object_store_memory=200 * 1024**2,
        namespace=f"midfill-{name}",
        configure_logging=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    build_app = import_attr(APP_IMPORT_PATH)
    registry = Registry(tracking_uri)
    served: ServeArgs | None = None
    failed: set[str] = set()  # versions whose rollout failed: not retried until the spec changes
    try:
        while not stop["requested"]:
            record = store.get(KIND, name)
            if record is None or record.local.stop_requested:
                break
            served = _reconcile(store, record, registry=registry, tracking_uri=tracking_uri, port=port, served=served, failed=failed, serve=serve, build_app=build_app)
            for _ in range(int(POLL_SECONDS * 10)):
                if stop["requested"]:
                    break
                time.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        shutil.rmtree(_ray_temp_dir(store.state_dir, name), ignore_errors=True)  # Ray's session files
        store.update(KIND, name, _stopped)
    return 0


def _port_from_url(url: str | None) -> int | None:
    if not url:
        return None
    with contextlib.suppress(ValueError, IndexError):
        return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return None


def _stopped(rec: StoredResource) -> None:
    status = rec.status()
    status.phase = "Degraded"
    status.url = None
    status.message = "stopped: the local endpoint is down; apply the same YAML again to restart it"
    status.conditions = set_condition(status.conditions, type="Available", status="False", reason="Stopped", message=status.message, observed_generation=rec.resource["metadata"]["generation"])
    rec.set_status(status)
    rec.add_event("Stopped", status.message)


def _reconcile(store, record, *, registry, tracking_uri, port, served, failed, serve, build_app) -> ServeArgs | None:
    """One pass: resolve, check approval, (re)deploy if needed, write status. Returns what is served."""
    release = typed_model_release(record)
    gen = record.resource["metadata"]["generation"]
    status = record.status()
    cond = status.conditions
    status.observed_generation = gen
    # As the operator reports it: the endpoint's base URL (OpenAI clients add /v1).
    url = f"http://127.0.0.1:{port}{release.spec.endpoint.route_prefix.rstrip('/')}"

    def write(event: tuple[str, str, str] | None = None) -> None:
        status.conditions = cond

        def change(rec: StoredResource) -> None:
            rec.set_status(status)
            if event:
                rec.add_event(event[1], event[2], type=event[0])  # type: ignore[arg-type]

        store.update(KIND, record.name, change)

    if release.spec.paused and served is not None:
        status.phase, status.message = "Paused", f"paused: keeps serving version {status.stable_version}"
        write()
        return served
    try:
        version = resolve(registry, release)
    except RegistryError as exc:
        cond = set_condition(cond, type="ModelResolved", status="False", reason="NotFound", message=str(exc), observed_generation=gen)
        if served is None:
            name = release.spec.model.registered_model_name
            versions = [v.version for v in registry.versions(name)]
            if "alias" in str(exc):
                status.phase = "WaitingForApproval"
                status.message = (
                    f"waiting for approval: {exc} (versions: {', '.join(versions) or 'none yet'}); approve one: "
                    f"midfill approve {name} --version {versions[-1] if versions else 'N'}"
                )
            else:
                status.phase, status.message = "Pending", f"waiting: {exc}"
        write(("Warning", "ModelNotResolved", str(exc)))
        return served
    status.resolved_version = version.version
    ref = release.spec.model
    what = f"version {ref.version}" if ref.version is not None else f"alias {ref.effective_alias()}"
    cond = set_condition(cond, type="ModelResolved", status="True", reason="Resolved", message=f"{ref.registered_model_name} {what} -> version {version.version}", observed_generation=gen)
    approval = release.spec.approval
    missing = unmet_approval(version, required_tags=approval.required_tags, required_alias=approval.required_alias,
                             min_metrics=approval.min_metrics)
    if missing:
        waits = f"version {version.version} waits for approval: {', '.join(missing)} (midfill approve {version.name} --version {version.version})"
        cond = set_condition(cond, type="Approved", status="False", reason=approval_reason(missing), message=waits, observed_generation=gen)
        if served is None:
            status.phase, status.message = "WaitingForApproval", waits
        else:
            status.message = f"serving version {status.stable_version}; {waits}"
        write(("Normal", "WaitingForApproval", waits))
        return served
    cond = set_condition(cond, type="Approved", status="True", reason="Approved", message=f"version {version.version} meets the approval requirements", observed_generation=gen)
    keys = record.local.api_keys_file
    wanted = local_serve_args(release, version=version, tracking_uri=tracking_uri, keys=keys)
    attempt_key = f"{gen}:{version.uri}"
    if served != wanted and attempt_key in failed:
        return served  # its failure is in the status; a new version or spec change tries again
    if served == wanted:
        if status.phase != "Available" or status.url != url:
            status.phase, status.url, status.message = "Available", url, f"serving {version.uri} at {url}"
            cond = set_condition(cond, type="Available", status="True", reason="Healthy", message=status.message, observed_generation=gen)
            write()
        return served
    # Roll out: serve.run replaces the app's deployments (new replica up before the old one goes).
    status.phase, status.message = "Progressing", f"rolling out {version.uri}"
    cond = set_condition(cond, type="Progressing", status="True", reason="Deploying" if served is None else "Updating", message=status.message, observed_generation=gen)
    write(("Normal", "RollingOut", status.message))
    try:
        serve.run(build_app(wanted), name=record.name, route_prefix=wanted.route_prefix)
    except Exception as exc:  # noqa: BLE001 - a bad version must not take the controller down
        failure = f"rolling out {version.uri} failed: {type(exc).__name__}: {exc}"[:500]
        cond = set_condition(cond, type="Progressing", status="False", reason="RolloutFailed", message=failure, observed_generation=gen)
        if served is not None and release.spec.rollout.auto_rollback:
            with contextlib.suppress(Exception):
                serve.run(build_app(served), name=record.name, route_prefix=served.route_prefix)
            cond = set_condition(cond, type="RolledBack", status="True", reason="RolloutFailed", message=failure, observed_generation=gen)
            status.phase, status.message = "Degraded", f"{failure}; still serving version {status.stable_version}"
        else:
            status.phase, status.message = "Failed", failure
            cond = set_condition(cond, type="Available", status="False", reason="RolloutFailed", message=failure, observed_generation=gen)
        write(("Warning", "RolloutFailed", failure))
        failed.add(attempt_key)
        return served
    if status.stable_version != version.version:
        status.previous_stable_version = status.stable_version
    status.stable_version = version.version
    status.phase, status.url, status.message = "Available", url, f"serving {version.uri} at {url}"
    cond = set_condition(cond, type="Progressing", status="False", reason="Complete", message=status.message, observed_generation=gen)
    cond = set_condition(cond, type="Available", status="True", reason="Healthy", message=status.message, observed_generation=gen)
    cond = set_condition(cond, type="Degraded", status="False", reason="Healthy", message="", observed_generation=gen)
    write(("Normal", "Available", status.message))
    return wanted


def wait_available(store: StateStore, name: str, *, timeout: float, poll: float = 1.0) -> ModelReleaseStatus:
    """Block until the release is Available (or the timeout passes); the last status."""
    deadline = time.monotonic() + timeout
    while True:
        record = observe(store, name)
        assert record is not None
        status = record.status()
        if status.phase == "Available" or time.monotonic() > deadline or not controller_alive(record):
            return status
        time.sleep(poll)
