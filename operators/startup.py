"""Operator start-up: kopf settings from OperatorSettings, and the shared clients handlers use (memo)."""

from __future__ import annotations

import functools
from typing import Any

import kopf

from operators.kube import Kube
from operators.settings import OperatorSettings


def configure(
    kopf_settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, settings: OperatorSettings | None = None
) -> None:
    """Apply our settings to kopf and put settings, the Kubernetes client and MLflow into `memo`.

    Values already in memo (tests pass their own) win over the environment.
    """
    settings = memo.get("settings") or settings or OperatorSettings()
    memo.settings = settings
    # kopf #585: a watch that never times out can stall silently forever; reconnect regularly.
    kopf_settings.watching.server_timeout = settings.watch_server_timeout
    kopf_settings.watching.client_timeout = settings.watch_client_timeout
    kopf_settings.watching.connect_timeout = 30
    # Peering (one active replica) when kopf's peering CRDs are installed; without them kopf falls
    # back to standalone with a warning instead of pausing (mandatory=False).
    kopf_settings.peering.name = settings.peering_name
    kopf_settings.peering.standalone = settings.standalone
    kopf_settings.peering.mandatory = False
    # Namespaces are given explicitly (or the operator is cluster-wide): no need to list them.
    kopf_settings.scanning.disabled = True
    # Our status lives in .status; kopf's own progress goes to annotations only.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="midfill.dev")
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="midfill.dev")
    kopf_settings.persistence.finalizer = "midfill.dev/kopf-finalizer"  # kopf stops resync timers before deletion
    kopf_settings.posting.reporting_component = "midfill-operator"
    if "kube" not in memo:
        memo.kube = Kube()
    if "registry" not in memo:
        memo.registry = functools.cache(_registry(settings.tracking_uri))
    if not settings.tracking_uri:
        logger.warning(
            "MIDFILL_TRACKING_URI is not set: training progress and registered versions cannot be read, "
            "and ModelReleases cannot resolve versions"
        )


def _registry(tracking_uri: str | None):
    def make():
        from midfill.registry import Registry  # imports mlflow: seconds, so only when first needed

        # One try per call: a handler must not sit in MLflow's outage while Jobs and RayServices wait;
        # the resync timer asks again, and the status says MLflow is what the resource waits for.
        return Registry(tracking_uri, retry_seconds=0)

    return make
