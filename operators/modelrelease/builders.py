"""Pure builders: a ModelRelease + resolved version -> the KubeRay RayService that serves it.

The model version appears only in `spec.serveConfigV2` (and our annotation), never in
`rayClusterConfig`: KubeRay applies a serveConfigV2 change in place to the running cluster, while a
rayClusterConfig change starts a second cluster (2x GPUs during the switch, kuberay #1476).
"""

from __future__ import annotations

from typing import Any

import yaml

from midfill.api import API_VERSION, ModelRelease
from midfill.api.modelrelease import DEFAULT_SERVING_IMAGE
from midfill.serve_args import KEY_SETTINGS, PROXY_ENV, RELOADABLE, ROUTER_SETTINGS, ServeArgs
from operators.settings import OperatorSettings

APP_NAME = "infill"
IMPORT_PATH = "serving.app:build_app"
SERVE_PORT = 8000
RAY_VERSION = "2.60.0"
API_KEYS_DIR = "/etc/midfill/api-keys"
DEPLOYMENT_NAME = "InfillServer"  # serving.ingress.InfillServer's deployment name
# strategy Canary (serving.app, serving.canary): the canary's model deployment and the router in front.
CANARY_DEPLOYMENT_NAME, ROUTER_DEPLOYMENT_NAME = "InfillCanary", "CanaryRouter"
LABEL_RELEASE = "midfill.dev/model-release"
ANNOTATION_VERSION = "midfill.dev/model-version"
ANNOTATION_ROLLOUT_START = "midfill.dev/rollout-start"
# strategy Canary: the canary version beside the stable one ("" when none) and its weight (percent).
ANNOTATION_CANARY = "midfill.dev/canary-version"
ANNOTATION_CANARY_WEIGHT = "midfill.dev/canary-weight"
# The ModelRelease generation the RayService was built from: a spec edit (a higher generation) is
# redeployed even when the version stays.
ANNOTATION_GENERATION = "midfill.dev/release-generation"
MANAGED_BY = {"app.kubernetes.io/managed-by": "midfill-operator"}
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
HEAD_RESOURCES = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}


def model_uri(release: ModelRelease, version: str | None) -> str:
    """models:/<name>/<version>: the operator always pins the resolved version (rollbacks are exact)."""
    name = release.spec.model.registered_model_name
    if version is None:  # only `midfill render` without --version: shows what the alias resolves at run time
        return f"models:/{name}@{release.spec.model.effective_alias()}"
    return f"models:/{name}/{version}"


def serve_args(
    release: ModelRelease, *, version: str | None, settings: OperatorSettings, canary: str | None = None
) -> dict[str, Any]:
    ref = release.spec.auth.api_key_secret_ref
    return ServeArgs.for_release(
        release,
        model_uri=model_uri(release, version),
        tracking_uri=settings.tracking_uri,
        api_keys_file=f"{API_KEYS_DIR}/{ref.key}" if ref else None,
        canary_model_uri=model_uri(release, canary) if canary else None,
    ).model_dump(mode="json")


def build_serve_config(
    release: ModelRelease,
    *,
    version: str | None,
    settings: OperatorSettings,
    canary: str | None = None,
    weight: int = 0,
) -> str:
    """The Ray Serve config (YAML text, as KubeRay's serveConfigV2 takes it). With strategy Canary
    the app is the canary router: `canary` (if any) serves beside `version` at `weight` percent."""
    args = serve_args(release, version=version, settings=settings, canary=canary)
    # Limits go in the deployment's user_config only: Ray hashes the app's args into its code
    # version, so a limit left in the args would replace every replica instead of reconfiguring it.
    # The key file settings stay in both (the replica reads them at start and on reconfigure), and
    # so does max_queued_requests: build_app sizes Ray's own queue backstop from it.
    user_config = {key: args[key] for key in RELOADABLE}
    in_both = (*KEY_SETTINGS, "max_queued_requests")
    init_args = {key: value for key, value in args.items() if key not in RELOADABLE or key in in_both}
    # The canary's weight goes to the router's user_config only: a step reconfigures the router,
    # never the model replicas. Without the router (InPlace) the args are those of before canaries.
    for key in ROUTER_SETTINGS if not args["router"] else ("canary_weight",):
        init_args.pop(key, None)
    deployments: list[dict[str, Any]] = [{"name": DEPLOYMENT_NAME, "user_config": user_config}]
    if args["router"]:
        if canary:
            deployments.append({"name": CANARY_DEPLOYMENT_NAME, "user_config": user_config})
        deployments.append({"name": ROUTER_DEPLOYMENT_NAME, "user_config": {"weight": weight if canary else 0}})
    config = {
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {
                "name": APP_NAME,
                "import_path": IMPORT_PATH,
                "route_prefix": release.spec.endpoint.route_prefix,
                "args": init_args,
                "deployments": deployments,
            }
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def _container(
    name: str,
    image: str,
    resources: dict[str, Any],
    settings: OperatorSettings,
    release: ModelRelease,
    ports: list[dict[str, Any]],
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image}
    if resources:
        container["resources"] = resources
    if ports:
        container["ports"] = ports
    # Every node runs a Serve proxy: each loads the replica-lost answers (midfill.serve_args.PROXY_ENV).
    env = [{"name": name, "value": value} for name, value in PROXY_ENV.items()]
    if settings.tracking_uri:
        env.append({"name": "MIDFILL_TRACKING_URI", "value": settings.tracking_uri})
    container["env"] = env
    if release.spec.auth.api_key_secret_ref:
        container["volumeMounts"] = [{"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}]
    return container


def _volumes(release: ModelRelease) -> list[dict[str, Any]]:
    ref = release.spec.auth.api_key_secret_ref
    return [{"name": "api-keys", "secret": {"secretName": ref.name}}] if ref else []


def build_cluster_config(release: ModelRelease, *, settings: OperatorSettings) -> dict[str, Any]:
    """rayClusterConfig: a small CPU head (no replicas on it) and one autoscaled worker group on the node pool."""
    spec = release.spec
    image = settings.serving_image if spec.endpoint.image == DEFAULT_SERVING_IMAGE else spec.endpoint.image
    head_ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": SERVE_PORT},
    ]
    head_pod: dict[str, Any] = {
        "containers": [_container("ray-head", image, HEAD_RESOURCES, settings, release, head_ports)]
    }
    worker_resources = {k: v for k, v in spec.endpoint.resources_per_replica.to_wire().items() if v}
    worker_pod: dict[str, Any] = {
        "containers": [_container("ray-worker", image, worker_resources, settings, release, [])]
    }
    if _volumes(release):
        head_pod["volumes"] = _volumes(release)
        worker_pod["volumes"] = _volumes(release)
    pool = spec.endpoint.node_pool
    if pool.node_selector:
        worker_pod["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        worker_pod["tolerations"] = [t.to_wire() for t in pool.tolerations]
    if pool.affinity:
        worker_pod["affinity"] = pool.affinity
    head_meta: dict[str, Any] = {"labels": {**MANAGED_BY, LABEL_RELEASE: release.metadata.name}}
    worker_meta: dict[str, Any] = {"labels": {**MANAGED_BY, LABEL_RELEASE: release.metadata.name}}
    template = spec.endpoint.pod_template
    template.apply(head_pod, head_meta, containers=head_pod["containers"])
    template.apply(worker_pod, worker_meta, containers=worker_pod["containers"])
    auto = spec.autoscaling
    # A canary's replicas (1 up to maxReplicas, serving.app) run beside the stable ones.
    most = auto.max_replicas * (2 if spec.rollout.strategy == "Canary" else 1)
    return {
        "rayVersion": RAY_VERSION,
        # Ray's autoscaler adds worker pods as Serve adds replicas (one replica per worker pod).
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {"metadata": head_meta, "spec": head_pod},
        },
        "workerGroupSpecs": [
            {
                "groupName": "replicas",
                "replicas": auto.min_replicas,
                "minReplicas": auto.min_replicas,
                "maxReplicas": most,
                "rayStartParams": {},
                "template": {"metadata": worker_meta, "spec": worker_pod},
            }
        ],
    }


def _canary_annotations(release: ModelRelease, canary: str | None, weight: int) -> dict[str, str]:
    if release.spec.rollout.strategy != "Canary":
        return {}
    return {ANNOTATION_CANARY: canary or "", ANNOTATION_CANARY_WEIGHT: str(weight if canary else 0)}


def build_rayservice(
    release: ModelRelease,
    *,
    version: str | None,
    settings: OperatorSettings,
    rollout_start: str | None = None,
    canary: str | None = None,
    weight: int = 0,
) -> dict[str, Any]:
    """The whole RayService for serving `version` (None: unresolved, for `midfill render` only),
    with `canary` beside it at `weight` percent (strategy Canary)."""
    annotations = _canary_annotations(release, canary, weight)
    if release.metadata.generation is not None:
        annotations[ANNOTATION_GENERATION] = str(release.metadata.generation)
    if version is not None:
        annotations[ANNOTATION_VERSION] = version
    if rollout_start is not None:
        annotations[ANNOTATION_ROLLOUT_START] = rollout_start
    meta: dict[str, Any] = {
        "name": release.endpoint_name(),
        "labels": {**MANAGED_BY, LABEL_RELEASE: release.metadata.name},
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": "ModelRelease",
                "name": release.metadata.name,
                "uid": release.metadata.uid or PLACEHOLDER_UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        meta["annotations"] = annotations
    if release.metadata.namespace:
        meta["namespace"] = release.metadata.namespace
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta,
        "spec": {
            "serveConfigV2": build_serve_config(
                release, version=version, settings=settings, canary=canary, weight=weight
            ),
            "rayClusterConfig": build_cluster_config(release, settings=settings),
        },
    }


def version_patch(
    release: ModelRelease,
    *,
    version: str,
    settings: OperatorSettings,
    rollout_start: str,
    spec_changed: bool = False,
    canary: str | None = None,
    weight: int = 0,
) -> dict[str, Any]:
    """The in-place update to another version: serveConfigV2 and our annotations, nothing else, unless
    the release's spec changed since the RayService was built: then the cluster config follows too
    (KubeRay then starts the new cluster beside the old one and switches when it is ready)."""
    annotations = {ANNOTATION_VERSION: version, ANNOTATION_ROLLOUT_START: rollout_start}
    annotations.update(_canary_annotations(release, canary, weight))
    if release.metadata.generation is not None:
        annotations[ANNOTATION_GENERATION] = str(release.metadata.generation)
    config = build_serve_config(release, version=version, settings=settings, canary=canary, weight=weight)
    spec: dict[str, Any] = {"serveConfigV2": config}
    if spec_changed:
        spec["rayClusterConfig"] = build_cluster_config(release, settings=settings)
    return {"metadata": {"annotations": annotations}, "spec": spec}


def serve_service(release: ModelRelease) -> str:
    """KubeRay's Service in front of the RayService's Serve proxies (follows the active cluster)."""
    return f"{release.endpoint_name()}-serve-svc"


def endpoint_url(release: ModelRelease) -> str:
    """KubeRay's serve Service: <rayservice>-serve-svc, port 8000."""
    ns = release.metadata.namespace or "default"
    return f"http://{release.endpoint_name()}-serve-svc.{ns}.svc.cluster.local:{SERVE_PORT}{release.spec.endpoint.route_prefix.rstrip('/')}"
