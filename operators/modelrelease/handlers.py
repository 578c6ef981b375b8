"""Thin kopf handlers for ModelReleases: resolve in MLflow, reconcile (pure), act on the RayService,
write status once if changed. A timer re-resolves the alias, since approvals happen in MLflow where
no watch event reaches us."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import kopf

from midfill.api import GROUP, VERSION, ModelRelease
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.lifecycle.canary import split_from_health
from midfill.lifecycle.clock import fmt_time, parse_time, utcnow
from midfill.lifecycle.modelrelease import (
    Deploy,
    DeploymentView,
    Observed,
    Resolution,
    reconcile,
    resolve,
    served_by,
)
from operators import common
from operators.kube import MODELRELEASES, RAYSERVICES, Kube
from operators.modelrelease import builders
from operators.settings import OperatorSettings

RESYNC_SECONDS = OperatorSettings().resync_seconds
__all__ = ["resolve", "rayservice_view", "sync"]


def rayservice_view(obj: dict[str, Any], release: ModelRelease | None = None, health: Any = None) -> DeploymentView:
    """Read a RayService: our annotations, whether KubeRay reports the app RUNNING for the current
    spec (status.observedGeneration caught up with metadata.generation) or DEPLOY_FAILED, and what the
    endpoint's /health answered (`health`: its JSON body, None when it did not answer)."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    status = obj.get("status") or {}
    app = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(builders.APP_NAME) or {}
    app_status = app.get("status", "")
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    current = observed is None or generation is None or observed >= generation
    text = f"application {builders.APP_NAME}: {app_status or 'no status yet'}" + (
        "" if current else " (for an older spec)"
    )
    if app.get("message"):
        text += f": {app['message']}"
    served, said = (None, "") if release is None else served_by(health, registered_model=_model(release))
    built_from = annotations.get(builders.ANNOTATION_GENERATION)
    weight = annotations.get(builders.ANNOTATION_CANARY_WEIGHT, "0")
    return DeploymentView(
        version=annotations.get(builders.ANNOTATION_VERSION),
        rollout_start=parse_time(annotations.get(builders.ANNOTATION_ROLLOUT_START)),
        healthy=app_status == "RUNNING" and current,
        health=text + (f"; {said}" if said else ""),
        url=builders.endpoint_url(release) if release is not None else None,
        generation=int(built_from) if built_from and built_from.isdigit() else None,
        served=served,
        # Serve gave up starting the replicas (constructor failed: bad weights, OOM) for this spec.
        failed=text if app_status == "DEPLOY_FAILED" and current else None,
        canary=annotations.get(builders.ANNOTATION_CANARY) or None,
        canary_weight=int(weight) if weight.isdigit() else 0,
        split=split_from_health(health),
    )


def _model(release: ModelRelease) -> str:
    return release.spec.model.registered_model_name


async def endpoint_health(settings: OperatorSettings, release: ModelRelease) -> Any:
    """GET the release endpoint's /health (what the replicas serve): its JSON body, None when it
    does not answer 200 with JSON in time (not served yet, or unreachable)."""
    url = settings.endpoint_health_url.format(
        service=builders.serve_service(release),
        namespace=release.metadata.namespace or "default",
        route_prefix=release.spec.endpoint.route_prefix.rstrip("/"),
    )
    try:
        async with httpx.AsyncClient(timeout=settings.endpoint_health_timeout) as client:
            response = await client.get(url)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def observe(memo: Any, release: ModelRelease, body: dict[str, Any]) -> Observed:
    """The registry's answer, the RayService and what its endpoint serves, as they are now."""
    kube: Kube = memo.kube
    now = utcnow()
    try:
        resolution = await asyncio.to_thread(resolve, memo.registry(), release)
    except Exception as exc:  # MLflow unreachable: keep serving, say why nothing moves
        resolution = Resolution(error=f"MLflow at {memo.settings.tracking_uri} not readable: {exc}")
    raw_rs = await kube.get(RAYSERVICES, body["metadata"]["namespace"], release.endpoint_name())
    if raw_rs is None:
        return Observed(now=now, resolution=resolution)
    if body["metadata"].get("uid") not in common.owner_uids(raw_rs):
        raise kopf.TemporaryError(f"RayService {release.endpoint_name()} exists and belongs to someone else", delay=60)
    health = await endpoint_health(memo.settings, release)
    return Observed(now=now, resolution=resolution, deployment=rayservice_view(raw_rs, release, health))


async def act(
    kube: Kube,
    settings: OperatorSettings,
    release: ModelRelease,
    observed: Observed,
    actions: list,
    logger: kopf.Logger,
) -> None:
    namespace, name, now = release.metadata.namespace or "default", release.endpoint_name(), fmt_time(observed.now)
    for action in actions:
        assert isinstance(action, Deploy)
        dep = observed.deployment
        if dep is None:
            obj = builders.build_rayservice(
                release,
                version=action.version,
                settings=settings,
                rollout_start=now,
                canary=action.canary,
                weight=action.weight,
            )
            await kube.create(RAYSERVICES, namespace, obj)
            logger.info(f"created RayService {name} serving version {action.version}")
            continue
        spec_changed = dep.generation is not None and dep.generation != release.metadata.generation
        patch = builders.version_patch(
            release,
            version=action.version,
            settings=settings,
            rollout_start=now,
            spec_changed=spec_changed,
            canary=action.canary,
            weight=action.weight,
        )
        await kube.patch(RAYSERVICES, namespace, name, patch)
        split = f" with canary version {action.canary} at {action.weight}%" if action.canary else ""
        logger.info(
            f"RayService {name}: now serves version {action.version}{split}"
            + (" with the edited spec" if spec_changed else "")
        )


async def sync(memo: Any, namespace: str, name: str, logger: kopf.Logger) -> None:
    kube: Kube = memo.kube
    async with common.object_lock("mr", namespace, name):
        body = await kube.get(MODELRELEASES, namespace, name)
        if body is None:  # gone: its RayService must not outlive it, even if the DELETED event was missed
            await _delete_rayservices_of(kube, namespace, name, owner_uid=None, logger=logger)
            return
        if body["metadata"].get("deletionTimestamp"):
            return
        release, status, raw_status = common.split_body(body, ModelReleaseStatus)
        if isinstance(release, ModelRelease):
            observed = await observe(memo, release, body)
        else:
            observed = Observed(now=utcnow(), resolution=Resolution(error="spec is invalid"))
        plan = reconcile(release, status=status, observed=observed, generation=body["metadata"].get("generation"))
        if isinstance(release, ModelRelease):
            await act(kube, memo.settings, release, observed, plan.actions, logger)
        await common.write_status(kube, MODELRELEASES, body, raw_status, plan.status, logger)


@kopf.on.resume(GROUP, VERSION, "modelreleases")
@kopf.on.create(GROUP, VERSION, "modelreleases")
@kopf.on.update(GROUP, VERSION, "modelreleases", field="spec")
async def release_changed(name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    namespace = common.namespaced(namespace)
    await sync(memo, namespace, name, logger)


@kopf.timer(GROUP, VERSION, "modelreleases", interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def release_resync(name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Approvals and aliases change in MLflow, health changes in KubeRay: look again."""
    namespace = common.namespaced(namespace)
    await sync(memo, namespace, name, logger)


@kopf.on.event("ray.io", "v1", "rayservices", labels={builders.LABEL_RELEASE: kopf.PRESENT, **builders.MANAGED_BY})
async def rayservice_event(
    labels: Mapping[str, str], namespace: str | None, type: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """KubeRay updated the RayService's status (healthy, failing): re-check its release now."""
    namespace = common.namespaced(namespace)
    await sync(memo, namespace, labels[builders.LABEL_RELEASE], logger)


@kopf.on.event(GROUP, VERSION, "modelreleases")
async def release_deleted(
    type: str | None, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    namespace = common.namespaced(namespace)
    if type != "DELETED":
        return
    await _delete_rayservices_of(memo.kube, namespace, name, owner_uid=body["metadata"].get("uid"), logger=logger)
    common.forget_lock("mr", namespace, name)


async def _delete_rayservices_of(
    kube: Kube, namespace: str, name: str, *, owner_uid: str | None, logger: kopf.Logger
) -> None:
    """Delete the RayServices we made for release `name`: those owned by `owner_uid`, or (None) all of
    them, once the release is known to be gone. (Kubernetes' garbage collector would do it through the
    ownerReference; this also covers clusters and emulators without one.)"""
    for obj in await kube.list(RAYSERVICES, namespace, {builders.LABEL_RELEASE: name, **builders.MANAGED_BY}):
        if owner_uid is None or owner_uid in common.owner_uids(obj):
            await kube.delete(RAYSERVICES, namespace, obj["metadata"]["name"])
            logger.info(f"deleted RayService {obj['metadata']['name']} of deleted ModelRelease {name}")
