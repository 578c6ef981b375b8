"""Thin kopf handlers for ModelReleases: resolve in MLflow, reconcile (pure), act on the RayService,
write status once if changed. A timer re-resolves the alias, since approvals happen in MLflow where
no watch event reaches us."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import defaultdict
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from midfill.api import GROUP, VERSION, ModelRelease, SpecError, parse_resource
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.registry import RegistryError, unmet_approval
from operators.kube import MODELRELEASES, RAYSERVICES, Kube, status_patch
from operators.modelrelease import builders
from operators.modelrelease.reconcile import (
    CreateRayService, Observed, Resolution, UpdateVersion, rayservice_view, reconcile,
)
from operators.settings import OperatorSettings
from operators.trainingrun.reconcile import fmt_time

RESYNC_SECONDS = OperatorSettings().resync_seconds
_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)


def split_body(body: dict[str, Any]) -> tuple[ModelRelease | SpecError, ModelReleaseStatus, dict[str, Any]]:
    raw_status = dict(body.get("status") or {})
    try:
        status = ModelReleaseStatus.model_validate({k: v for k, v in raw_status.items() if k != "kopf"})
    except ValueError:
        status = ModelReleaseStatus()
    try:
        release: ModelRelease | SpecError = parse_resource({k: v for k, v in body.items() if k != "status"})
    except SpecError as exc:
        release = exc
    return release, status, raw_status


def resolve(registry: Any, release: ModelRelease) -> Resolution:
    """Blocking: the version the release points at, and what it lacks for approval."""
    ref, approval = release.spec.model, release.spec.approval
    try:
        info = registry.get(ref.registered_model_name, version=ref.version, alias=ref.effective_alias())
    except RegistryError as exc:
        return Resolution(error=str(exc))
    unmet = unmet_approval(info, required_tags=approval.required_tags, required_alias=approval.required_alias,
                           min_metrics=approval.min_metrics)
    return Resolution(version=info.version, unmet=tuple(unmet))


async def sync(memo: Any, namespace: str, name: str, logger: logging.Logger) -> None:
    kube: Kube = memo.kube
    settings: OperatorSettings = memo.settings
    async with _locks[(namespace, name)]:
        body = await kube.get(MODELRELEASES, namespace, name)
        if body is None:  # gone: its RayService must not outlive it, even if the DELETED event was missed
            await _delete_rayservices_of(kube, namespace, name, owner_uid=None, logger=logger)
            return
        if body["metadata"].get("deletionTimestamp"):
            return
        release, status, raw_status = split_body(body)
        now = dt.datetime.now(dt.timezone.utc)
        resolution, rs_view = Resolution(error="spec is invalid"), None
        if isinstance(release, ModelRelease):
            try:
                resolution = await asyncio.to_thread(resolve, memo.registry(), release)
            except Exception as exc:  # MLflow unreachable: keep serving, say why nothing moves
                resolution = Resolution(error=f"MLflow at {settings.tracking_uri} not readable: {exc}")
            raw_rs = await kube.get(RAYSERVICES, namespace, release.endpoint_name())
            if raw_rs is not None:
                owners = {o.get("uid") for o in raw_rs["metadata"].get("ownerReferences") or []}
                if body["metadata"].get("uid") not in owners:
                    raise kopf.TemporaryError(f"RayService {release.endpoint_name()} exists and belongs to someone else", delay=60)
                rs_view = rayservice_view(raw_rs)
        plan = reconcile(release, status=status, observed=Observed(now=now, resolution=resolution, rayservice=rs_view),
                         generation=body["metadata"].get("generation"))
        for action in plan.actions:
            assert isinstance(release, ModelRelease)
            if isinstance(action, CreateRayService):
                obj = builders.build_rayservice(release, version=action.version, settings=settings, rollout_start=fmt_time(now))
                await kube.create(RAYSERVICES, namespace, obj)
                logger.info(f"created RayService {release.endpoint_name()} serving version {action.version}")
            elif isinstance(action, UpdateVersion):
                patch = builders.version_patch(release, version=action.version, settings=settings, rollout_start=fmt_time(now))
                await kube.patch(RAYSERVICES, namespace, release.endpoint_name(), patch)
                logger.info(f"RayService {release.endpoint_name()}: serveConfigV2 now serves version {action.version}")
        # The one place a ModelRelease's status is written, and only when it changed.
        patch = status_patch(raw_status, plan.status.to_wire())
        if patch:
            try:
                await kube.patch(MODELRELEASES, namespace, name, {"status": patch}, subresource="status")
            except ApiException as exc:
                if exc.status != 404:
                    raise
                logger.debug("the ModelRelease was deleted while it was being synced; nothing to report")
                return
            if "phase" in patch:
                kind = "Warning" if plan.status.phase in ("Failed", "Degraded") else "Normal"
                kopf.event(body, type=kind, reason=plan.status.phase, message=plan.status.message or "")
                logger.info(f"phase {plan.status.phase}: {plan.status.message}")


@kopf.on.resume(GROUP, VERSION, "modelreleases")
@kopf.on.create(GROUP, VERSION, "modelreleases")
@kopf.on.update(GROUP, VERSION, "modelreleases", field="spec")
async def release_changed(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await sync(memo, namespace, name, logger)


@kopf.timer(GROUP, VERSION, "modelreleases", interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def release_resync(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Approvals and aliases change in MLflow, health changes in KubeRay: look again."""
    await sync(memo, namespace, name, logger)


@kopf.on.event("ray.io", "v1", "rayservices", labels={builders.LABEL_RELEASE: kopf.PRESENT, **builders.MANAGED_BY})
async def rayservice_event(labels: dict[str, str], namespace: str, type: str | None, memo: kopf.Memo,
                           logger: logging.Logger, **_: Any) -> None:
    """KubeRay updated the RayService's status (healthy, failing): re-check its release now."""
    await sync(memo, namespace, labels[builders.LABEL_RELEASE], logger)


@kopf.on.event(GROUP, VERSION, "modelreleases")
async def release_deleted(type: str | None, body: kopf.Body, name: str, namespace: str, memo: kopf.Memo,
                          logger: logging.Logger, **_: Any) -> None:
    if type != "DELETED":
        return
    await _delete_rayservices_of(memo.kube, namespace, name, owner_uid=body["metadata"].get("uid"), logger=logger)
    _locks.pop((namespace, name), None)


async def _delete_rayservices_of(kube: Kube, namespace: str, name: str, *, owner_uid: str | None,
                                 logger: logging.Logger) -> None:
    """Delete the RayServices we made for release `name`: those owned by `owner_uid`, or (None) all of
    them, once the release is known to be gone. (Kubernetes' garbage collector would do it through the
    ownerReference; this also covers clusters and emulators without one.)"""
    for obj in await kube.list(RAYSERVICES, namespace, {builders.LABEL_RELEASE: name, **builders.MANAGED_BY}):
        owners = {o.get("uid") for o in obj["metadata"].get("ownerReferences") or []}
        if owner_uid is None or owner_uid in owners:
            await kube.delete(RAYSERVICES, namespace, obj["metadata"]["name"])
            logger.info(f"deleted RayService {obj['metadata']['name']} of deleted ModelRelease {name}")
