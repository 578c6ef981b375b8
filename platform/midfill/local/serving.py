"""The local ModelRelease backend: a release controller with its own local Ray and Ray Serve.

`start_controller` (called by `midfill apply`) starts `python -m midfill.local control-release` in the
background. The controller owns a private local Ray cluster (like the RayService a release gets on
a cluster), started by `ray.init` in a short temp folder with no dashboard and a small object store,
and Serve's HTTP proxy on 127.0.0.1 at a free port kept in the resource (the URL stays the same when
the controller is restarted). Every few seconds it resolves the release's alias or version in the
registry, reads Serve's application status and the endpoint's own /health (the version it serves,
loaded and warmed up), and asks the ModelRelease state machine (`midfill.lifecycle.modelrelease`,
the operator's) what to serve; a Deploy `serve.run`s the app `serving.app:build_app` — found by its
import path, never imported here — with `ServeArgs.for_release(...)` pinned to that version.
Approval, spec edits, rollout.healthDeadlineSeconds and rollback behave as on a cluster. A newer
version is rolled out by `serve.run` with new args: Serve starts the new replica before it stops the
old one (serving.app's max_surge_percent), and the old one finishes its requests, so none are
dropped; a new version that fails to load leaves the old replica serving until the controller rolls
back to it. Stopping the controller (`midfill delete`) shuts Serve and its Ray down; Ray's processes
share the controller's fate if it dies.

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
import threading
import time
from dataclasses import replace
from pathlib import Path

from midfill.api import ModelRelease
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.lifecycle import modelrelease as lifecycle
from midfill.lifecycle.canary import split_from_health
from midfill.lifecycle.clock import utcnow
from midfill.lifecycle.events import phase_event
from midfill.lifecycle.modelrelease import Deploy, DeploymentView
from midfill.local import procs
from midfill.local.state import StateStore, StoredResource, typed_model_release
from midfill.registry import LOOP_RETRY_SECONDS, Registry, VersionInfo
from midfill.serve_args import PROXY_ENV, ServeArgs
from midfill.settings import CoreSettings

KIND = "ModelRelease"
APP_IMPORT_PATH = "serving.app:build_app"
POLL_SECONDS = 3.0
# Ray's CPUs are bookkeeping: replicas share the machine's real cores, so the local Ray declares
# plenty, leaving room for a rolling swap (old and new replica side by side) and autoscaling. A
# replica's request is capped at the real cores (it also sets the replica's torch threads).
LOGICAL_CPUS_MIN = 16
# The endpoint's own /health answers from memory; a replica that takes longer is as good as not ready.
ENDPOINT_HEALTH_TIMEOUT_S = 5.0


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
        message = "the local serving process is not running; apply the same YAML again to restart it"
        _write(
            rec,
            lifecycle.endpoint_down(
                rec.status(),
                reason="ControllerStopped",
                message=message,
                generation=rec.resource["metadata"]["generation"],
                now=utcnow(),
            ),
        )

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
        _write(rec, lifecycle.endpoint_starting(rec.status(), message="starting the local Ray Serve controller"))
        rec.add_event("ControllerStarting", f"local Ray Serve controller starting (log {rec.local.supervisor_log})")
        pid, ctime = procs.spawn_backend(
            "control-release",
            name=name,
            state_dir=store.state_dir,
            tracking_uri=settings.resolved_tracking_uri(),
            log_file=logs / "controller.log",
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


def local_serve_args(
    release: ModelRelease,
    *,
    version: VersionInfo,
    tracking_uri: str,
    keys: str | None,
    canary: VersionInfo | None = None,
    weight: int = 0,
) -> ServeArgs:
    """ServeArgs for the release pinned to one version (and, strategy Canary, a canary beside it at
    `weight` percent), with CPU requests fitted to this machine."""
    args = ServeArgs.for_release(
        release,
        model_uri=version.uri,
        tracking_uri=tracking_uri,
        api_keys_file=keys,
        canary_model_uri=canary.uri if canary else None,
        canary_weight=weight if canary else 0,
    )
    cpus = float(os.cpu_count() or 1)
    return args.model_copy(update={"num_cpus": min(args.num_cpus, cpus), "num_gpus": 0.0})


def control(state_dir: Path, name: str) -> int:
    """Serve a ModelRelease until it is deleted: an observe/act adapter around the ModelRelease state
    machine (`midfill.lifecycle.modelrelease`, the operator's), with a local Ray Serve app standing
    in for the RayService."""
    import ray
    from ray import serve

    store = StateStore(state_dir)
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    record = store.get(KIND, name)
    if record is None:
        return 0
    port = _port_from_url(record.resource.get("status", {}).get("url")) or free_port()
    cpus = os.cpu_count() or 1
    os.environ.update(PROXY_ENV)  # Ray's processes inherit it: the proxy's replica-lost answers
    ray.init(
        _temp_dir=_ray_temp_dir(store.state_dir, name),
        include_dashboard=False,
        num_cpus=max(LOGICAL_CPUS_MIN, 8 * cpus),
        object_store_memory=200 * 1024**2,
        namespace=f"midfill-{name}",
        configure_logging=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    controller = _Controller(store, name, port=port)
    try:
        while not stop["requested"] and controller.pass_once():
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


def _write(rec: StoredResource, status: ModelReleaseStatus) -> None:
    """Set the status, with the event its phase change calls for (as the operator emits it)."""
    event = phase_event(rec.status().phase, status.phase, status.message)
    rec.set_status(status)
    if event is not None:
        rec.add_event(event.reason, event.message, type=event.type)


def _stopped(rec: StoredResource) -> None:
    message = "stopped: the local endpoint is down; apply the same YAML again to restart it"
    _write(
        rec,
        lifecycle.endpoint_down(
            rec.status(),
            reason="Stopped",
            message=message,
            generation=rec.resource["metadata"]["generation"],
            now=utcnow(),
        ),
    )


class _Controller:
    """Observe (registry, the Serve app), reconcile (pure), act (`serve.run`), write the status.

    A deployment runs in a thread: `serve.run` returns only once the app is healthy (or raises),
    while the loop keeps observing so rollout.healthDeadlineSeconds and rollback apply as on a
    cluster. Serve starts a new replica before it stops the old one, so no request is dropped.
    """

    def __init__(self, store: StateStore, name: str, *, port: int) -> None:
        from ray._common.utils import import_attr

        self.store, self.name, self.port = store, name, port
        self.tracking_uri = CoreSettings(state_dir=store.state_dir).resolved_tracking_uri()
        self.registry = Registry(self.tracking_uri, retry_seconds=LOOP_RETRY_SECONDS)
        self.build_app = import_attr(APP_IMPORT_PATH)
        self.deployed: DeploymentView | None = None
        self.errors: dict[str, str] = {}  # deployment (version, canary, weight) -> why its serve.run raised

    def health(self, release: ModelRelease) -> DeploymentView | None:
        """The deployment as Serve and the endpoint itself report it: Serve's application status
        (RUNNING, or DEPLOY_FAILED: Ray gave up starting replicas), and the version the endpoint's
        /health says it serves, loaded and warmed up."""
        from ray import serve

        dep = self.deployed
        if dep is None:
            return None
        failed = self.errors.get(_deployment_key(dep.version, dep.canary, dep.canary_weight))
        try:
            app = serve.status().applications.get(self.name)
        except Exception as exc:  # noqa: BLE001 - Serve's controller busy or gone: not healthy, say why
            return replace(dep, healthy=False, health=f"Serve status unreadable: {exc}", served=None, failed=failed)
        state = str(getattr(app.status, "value", app.status)) if app else "not deployed"
        message = (app.message if app else "") or failed or ""
        if state == "DEPLOY_FAILED" and failed is None:
            failed = f"Serve: {message or state}"[:500]
        answer = self.endpoint_health(dep.url)
        served, said = lifecycle.served_by(answer, registered_model=release.spec.model.registered_model_name)
        health = f"application {self.name}: {state}" + (f": {message}" if message else "") + f"; {said}"
        return replace(
            dep,
            healthy=state == "RUNNING",
            health=health,
            served=served,
            failed=failed,
            split=split_from_health(answer),
        )

    @staticmethod
    def endpoint_health(url: str | None) -> object:
        """GET <url>/health (the JSON body), None when it does not answer 200 with JSON."""
        import httpx

        if not url:
            return None
        try:
            response = httpx.get(f"{url}/health", timeout=ENDPOINT_HEALTH_TIMEOUT_S)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def observe(self, release: ModelRelease) -> lifecycle.Observed:
        try:
            resolution = lifecycle.resolve(self.registry, release)
        except Exception as exc:  # noqa: BLE001 - MLflow unreadable: keep serving, say why nothing moves
            resolution = lifecycle.Resolution(error=f"MLflow at {self.tracking_uri} not readable: {exc}")
        return lifecycle.Observed(now=utcnow(), resolution=resolution, deployment=self.health(release))

    def deploy(self, record: StoredResource, release: ModelRelease, action: Deploy) -> None:
        from ray import serve

        model = release.spec.model.registered_model_name
        info = self.registry.get(model, version=action.version)
        canary = self.registry.get(model, version=action.canary) if action.canary else None
        args = local_serve_args(
            release,
            version=info,
            tracking_uri=self.tracking_uri,
            keys=record.local.api_keys_file,
            canary=canary,
            weight=action.weight,
        )
        url = f"http://127.0.0.1:{self.port}{release.spec.endpoint.route_prefix.rstrip('/')}"
        key = _deployment_key(action.version, action.canary, action.weight)
        self.errors.pop(key, None)

        def run() -> None:
            try:
                serve.run(self.build_app(args), name=self.name, route_prefix=args.route_prefix)
            except Exception as exc:  # noqa: BLE001 - a bad version must not take the controller down
                self.errors[key] = f"{type(exc).__name__}: {exc}"[:500]

        threading.Thread(target=run, name=f"deploy-{key}", daemon=True).start()
        self.deployed = DeploymentView(
            version=action.version,
            rollout_start=utcnow(),
            healthy=False,
            health="deploying",
            url=url,
            generation=record.resource["metadata"]["generation"],
            canary=action.canary,
            canary_weight=action.weight if action.canary else 0,
        )
        split = f" with canary {canary.uri} at {action.weight}%" if canary else ""
        self.store.update(
            KIND, self.name, lambda rec: rec.add_event("Deploying", f"serve.run {info.uri}{split} at {url}")
        )

    def pass_once(self) -> bool:
        """One observe/reconcile/act/write pass; False once the release is deleted."""
        record = self.store.get(KIND, self.name)
        if record is None or record.local.stop_requested:
            return False
        release = typed_model_release(record)
        plan = lifecycle.reconcile(
            release,
            status=record.status(),
            observed=self.observe(release),
            generation=record.resource["metadata"]["generation"],
        )
        for action in plan.actions:
            self.deploy(record, release, action)
        self.store.update(KIND, self.name, lambda rec: _write(rec, plan.status))
        return True


def _deployment_key(version: str | None, canary: str | None, weight: int) -> str:
    return f"{version}+{canary}@{weight}" if canary else str(version)


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
