"""The operator's only Kubernetes I/O: a few raw-JSON calls over the `kubernetes` client.

Raw dicts in and out (no model classes): builders produce dicts, reconcile reads dicts, and any
resource (Jobs, RayServices, our own CRs) goes through the same five calls. Every call is safe to
repeat: create treats "already exists" as done, delete treats "not found" as done.
The blocking client runs in worker threads so handlers stay async.
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException


@dataclass(frozen=True)
class Res:
    """A resource type: API group ('' = core), version and plural."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


JOBS = Res("batch", "v1", "jobs")
SERVICES = Res("", "v1", "services")
CONFIGMAPS = Res("", "v1", "configmaps")
RAYSERVICES = Res("ray.io", "v1", "rayservices")
TRAININGRUNS = Res("midfill.dev", "v1alpha1", "trainingruns")
MODELRELEASES = Res("midfill.dev", "v1alpha1", "modelreleases")


def load_client(*, connections: int = 16) -> client.ApiClient:
    """In-cluster service account if there is one, else the kubeconfig (KUBECONFIG / ~/.kube/config)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = connections  # one connection per worker thread
    return client.ApiClient(configuration)


def matches(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether an object carries all these labels (checked here too: not every server filters)."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class Kube:
    """get/list/create/patch/delete of raw objects; async wrappers run the blocking client in a thread."""

    def __init__(self, api_client: client.ApiClient | None = None, *, threads: int = 16) -> None:
        self.api = api_client or load_client(connections=threads)
        # Calls wait on the network, not the CPU: more threads than cores keeps a burst of runs moving.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        resp = self.api.call_api(
            path,
            method,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        data = resp.data
        return json.loads(data) if data else None

    # -- blocking calls -----------------------------------------------------------------------------
    def get_sync(self, res: Res, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", res.path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_sync(self, res: Res, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        try:
            found = self._call("GET", res.path(namespace), query=[("labelSelector", selector)])
        except ApiException as exc:
            if exc.status == 404:  # the resource type is not installed (e.g. no KubeRay CRD)
                return []
            raise
        return [o for o in (found or {}).get("items", []) if matches(o, labels)]

    def create_sync(self, res: Res, namespace: str, body: dict[str, Any]) -> bool:
        """Create; False when an object of that name already exists (idempotent retries)."""
        try:
            self._call("POST", res.path(namespace), body=body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def patch_sync(
        self, res: Res, namespace: str, name: str, body: dict[str, Any], *, subresource: str | None = None
    ) -> None:
        self._call(
            "PATCH", res.path(namespace, name, subresource), body=body, content_type="application/merge-patch+json"
        )

    def delete_sync(self, res: Res, namespace: str, name: str) -> bool:
        """Delete (children of a Job go in the background); False when it was already gone."""
        try:
            self._call("DELETE", res.path(namespace, name), body={"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # -- async wrappers -----------------------------------------------------------------------------
    async def get(self, res: Res, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._run(self.get_sync, res, namespace, name)

    async def list(self, res: Res, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return await self._run(self.list_sync, res, namespace, labels)

    async def create(self, res: Res, namespace: str, body: dict[str, Any]) -> bool:
        return await self._run(self.create_sync, res, namespace, body)

    async def patch(
        self, res: Res, namespace: str, name: str, body: dict[str, Any], *, subresource: str | None = None
    ) -> None:
        await self._run(self.patch_sync, res, namespace, name, body, subresource=subresource)

    async def delete(self, res: Res, namespace: str, name: str) -> bool:
        return await self._run(self.delete_sync, res, namespace, name)


def status_patch(
    old: dict[str, Any], new: dict[str, Any], *, keep: tuple[str, ...] = ("kopf",)
) -> dict[str, Any] | None:
    """A merge patch turning status `old` into `new` (null removes a field), or None when equal.

    Keys in `keep` belong to someone else (kopf's own bookkeeping) and are never touched.
    """
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new and k not in keep})
    return patch or None
