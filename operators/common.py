"""What the two resources' kopf handlers share: reading a body, ownership, locks, and writing status.

Each resource's handlers are an adapter around its state machine in `midfill.lifecycle`: observe
the cluster, call the pure `reconcile`, act, then `write_status` (the one place a status is written,
only when it changed, with one event per phase change).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, TypeVar, cast

import kopf
from kubernetes.client.rest import ApiException
from pydantic import BaseModel

from midfill.api import SpecError, parse_resource
from midfill.lifecycle.events import phase_event
from operators.kube import Kube, Res, status_patch

S = TypeVar("S", bound=BaseModel)

# One lock per object: concurrent triggers (a watch event, the timer, a child's event) queue up and
# each re-reads the object, so none acts on a stale status. Locks are kept per event loop: an asyncio
# lock belongs to the loop it was first awaited in, and an operator restarted in the same process
# (a new loop) must not find a lock its cancelled predecessor left held.
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, str], asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def object_lock(kind: str, namespace: str, name: str) -> asyncio.Lock:
    """The lock that serialises syncs of one object within the running operator."""
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault((kind, namespace, name), asyncio.Lock())


def forget_lock(kind: str, namespace: str, name: str) -> None:
    """Drop a deleted object's lock (names are reused; the dict must not grow forever)."""
    try:
        _locks.get(asyncio.get_running_loop(), {}).pop((kind, namespace, name), None)
    except RuntimeError:  # no running loop: nothing of ours to forget
        pass


def split_body(body: dict[str, Any], status_model: type[S]) -> tuple[Any, S, dict[str, Any]]:
    """Parse a resource as the API returned it: (resource or SpecError, our status, raw status)."""
    raw_status = dict(body.get("status") or {})
    try:
        status = status_model.model_validate({k: v for k, v in raw_status.items() if k != "kopf"})
    except ValueError:
        status = status_model()  # unreadable status (edited by hand): rebuilt from the cluster
    try:
        resource: Any = parse_resource({k: v for k, v in body.items() if k != "status"})
    except SpecError as exc:
        resource = exc
    return resource, status, raw_status


def owner_uids(obj: dict[str, Any]) -> set[str | None]:
    return {o.get("uid") for o in obj["metadata"].get("ownerReferences") or []}


def namespaced(namespace: str | None) -> str:
    """A handler's namespace: kopf types it optional (cluster-scoped kinds have none); ours are all namespaced."""
    if namespace is None:
        raise kopf.PermanentError("a namespaced resource arrived without a namespace")
    return namespace


async def write_status(
    kube: Kube, res: Res, body: dict[str, Any], raw_status: dict[str, Any], new: Any, logger: kopf.Logger
) -> None:
    """Patch the status if it changed, and emit the event the machine's phase change calls for."""
    meta = body["metadata"]
    patch = status_patch(raw_status, new.to_wire())
    if not patch:
        return
    try:
        await kube.patch(res, meta["namespace"], meta["name"], {"status": patch}, subresource="status")
    except ApiException as exc:
        if exc.status != 404:
            raise
        logger.debug("the object was deleted while it was being synced; nothing to report")
        return
    event = phase_event(raw_status.get("phase"), new.phase, new.message) if "phase" in patch else None
    if event is not None:
        # The object as the API server returned it is what kopf's RawBody describes.
        kopf.event(kopf.Body(cast(kopf.RawBody, body)), type=event.type, reason=event.reason, message=event.message)
        logger.info(f"phase {new.phase}: {new.message}")
