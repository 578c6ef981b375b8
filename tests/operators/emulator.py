"""Test helpers: the operator against kmock's KubernetesEmulator (a stateful in-memory Kubernetes API over real HTTP)
and a real MLflow on SQLite. See docs/cpu-notes.md for the emulator's gaps this works around."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

# Before the handlers are imported: their resync timer interval is read at import time.
os.environ.setdefault("MIDFILL_RESYNC_SECONDS", "1")

import aiohttp
import kmock
import pytest

RESOURCES = {
    "v1/namespaces": ("Namespace", False),  # kopf waits for it in discovery (scanning is disabled)
    "v1/events": ("Event", True),
    "v1/services": ("Service", True),
    "v1/configmaps": ("ConfigMap", True),
    "batch/v1/jobs": ("Job", True),
    "midfill.dev/v1alpha1/trainingruns": ("TrainingRun", True),
    "midfill.dev/v1alpha1/modelreleases": ("ModelRelease", True),
    "ray.io/v1/rayservices": ("RayService", True),
}
NS = "team"
REQUEST_LOG = 64  # requests the emulator remembers (kmock matches each new one by walking them all)


class Emulator(kmock.KubernetesEmulator):
    """Stamps what a real API server adds: uid, resourceVersion, generation (bumped on spec changes),
    creationTimestamp. kopf's patches rely on resourceVersion; our reconcile on generation."""

    _rv = itertools.count(1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Successful creates per (plural, name): a name created twice means an object was recreated.
        self.creates: Counter[tuple[str, str]] = Counter()

    async def _handle(self, request):  # type: ignore[override]
        self._forget_old_requests()
        response = await self._stamp_and_handle(request)
        if request.resource is not None and request.action == kmock.action.CREATE and response.status < 300:
            self.creates[request.resource.plural, (request.data.get("metadata") or {}).get("name", "")] += 1
        return response

    def _forget_old_requests(self) -> None:
        """kmock keeps every request for assertions and matches each new one by walking that log, so
        a long run slows down quadratically (the 50-lifecycle chaos run stalled in that matching).
        No test here asserts on the log: keep only the recent tail."""
        for log in (self._requests, *(payload._requests for payload in self._payloads)):
            if len(log) > REQUEST_LOG:
                del log[: len(log) - REQUEST_LOG // 2]

    async def _stamp_and_handle(self, request):
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["resourceVersion"] = str(next(self._rv))
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            rv = str(next(self._rv))
            if isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {}) if request.data.get("metadata") is not None else None
                if meta is None:
                    meta = request.data["metadata"] = {}
                meta["resourceVersion"] = rv
                key = (request.resource, request.namespace, request.name)
                if "spec" in request.data and key in self.objects and not self.objects[key].deleted:
                    meta["generation"] = int(self.objects[key].get("metadata", {}).get("generation", 1)) + 1
            elif isinstance(request.data, list):
                # A failed JSON-patch `test` (kopf's optimistic concurrency) is 422 on a real server.
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
                for op in request.data:
                    if (
                        op.get("op") == "test"
                        and op.get("path") == "/metadata/resourceVersion"
                        and current.get("metadata", {}).get("resourceVersion") != op.get("value")
                    ):
                        raise kmock.KubernetesError(status=422, reason="Invalid", message="resourceVersion test failed")
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
        return await super()._handle(request)


class Cluster:
    """The emulator plus the few calls tests make (what kubectl and controllers would do)."""

    def __init__(self, emulator: Emulator, server: kmock.Server, *, timeout: float = 10) -> None:
        self.emulator, self.server, self.timeout = emulator, server, timeout

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        res = next(r for r in RESOURCES if r.endswith("/" + plural))
        key = (kmock.resource(res), NS, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return self.emulator.objects[key].raw

    def names(self, plural: str) -> list[str]:
        return sorted(
            name
            for (res, ns, name), obj in self.emulator.objects.items()
            if res.plural == plural and ns == NS and not obj.deleted
        )

    def history(self, plural: str, name: str) -> list[dict[str, Any]]:
        res = next(r for r in RESOURCES if r.endswith("/" + plural))
        return [dict(v.raw) for v in self.emulator.objects[kmock.resource(res), NS, name].history if v is not None]

    def _session(self) -> aiohttp.ClientSession:
        # A connection per call: a kept-alive connection was seen to stall after the operator stopped.
        return aiohttp.ClientSession(
            base_url=self.server.url,
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )

    @staticmethod
    def _path(plural: str, name: str | None = None, sub: str | None = None) -> str:
        res = next(r for r in RESOURCES if r.endswith("/" + plural))
        group_version = res.rsplit("/", 1)[0]
        base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        return base + f"/namespaces/{NS}/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create(self, body: dict[str, Any]) -> None:
        plural = body["kind"].lower() + "s"
        body = {**body, "metadata": {**body["metadata"], "namespace": NS}}
        async with self._session() as session, session.post(self._path(plural), json=body) as resp:
            assert resp.status in (200, 201), await resp.text()

    async def patch(self, plural: str, name: str, body: dict[str, Any], sub: str | None = None) -> None:
        async with (
            self._session() as session,
            session.patch(
                self._path(plural, name, sub), json=body, headers={"Content-Type": "application/merge-patch+json"}
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()

    async def delete(self, plural: str, name: str) -> None:
        async with self._session() as session, session.delete(self._path(plural, name)) as resp:
            assert resp.status == 200, await resp.text()


@contextlib.asynccontextmanager
async def emulated_cluster(folder: Path) -> AsyncIterator[tuple[Cluster, Path]]:
    """The emulator serving RESOURCES over HTTP, and a kubeconfig file (in `folder`) that points at it."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        for res, (kind, namespaced) in RESOURCES.items():
            emulator.resources[res] = kmock.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                verbs={"get", "list", "watch", "create", "patch", "delete"},
                subresources={"status"} if "." in res.split("/")[0] or res.startswith("batch") else set(),
            )
        kubeconfig = folder / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
            f"clusters: [{{name: emu, cluster: {{server: '{server.url}'}}}}]\n"
            "users: [{name: emu, user: {token: test}}]\n"
            "contexts: [{name: emu, context: {cluster: emu, user: emu}}]\n"
        )
        yield Cluster(emulator, server), kubeconfig


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    import kubernetes.config.kube_config as kube_config

    async with emulated_cluster(tmp_path) as (cluster, kubeconfig):
        # Only the emulator, whatever this process runs in: kopf's login and operators.kube try the
        # in-cluster service account first (found through KUBERNETES_SERVICE_HOST), then KUBECONFIG,
        # which the kubernetes client also reads at import time into its default location.
        for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        yield cluster


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@contextlib.asynccontextmanager
async def running_operator(tracking_uri: str, **settings: Any) -> AsyncIterator[None]:
    """The real operator (all handlers of operators.main) as a task in this event loop."""
    import kopf

    import operators.main  # noqa: F401  (registers the handlers)
    from operators.settings import OperatorSettings

    stop, ready = asyncio.Event(), asyncio.Event()
    memo = kopf.Memo(settings=OperatorSettings(tracking_uri=tracking_uri, standalone=True, **settings))
    task = asyncio.create_task(
        kopf.operator(clusterwide=True, standalone=True, memo=memo, stop_flag=stop, ready_flag=ready)
    )
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            import sys

            for t in asyncio.all_tasks():
                t.print_stack(limit=3, file=sys.stderr)
        await asyncio.wait_for(task, 30)


@pytest.fixture
def operator(tracking_uri: str, serve_endpoint) -> Callable[..., contextlib.AbstractAsyncContextManager[None]]:
    """The operator, reading releases' /health from the test's serve_endpoint (tests/operators/serve_endpoint.py)."""
    return lambda **settings: running_operator(
        tracking_uri, **{"endpoint_health_url": serve_endpoint.url_template, **settings}
    )


async def eventually(check: Callable[[], Any], *, timeout: float = 30, what: str = "") -> Any:
    """Poll `check` until it returns something truthy (the operator is asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        try:
            last = check()
        except (KeyError, TypeError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")
