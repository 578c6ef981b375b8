"""Settings of the operator process (environment variables with the MIDFILL_ prefix).

The Helm chart sets these by name (MIDFILL_WATCH_NAMESPACES, MIDFILL_TRACKING_URI, ...); keep
the names stable.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from midfill.api.modelrelease import DEFAULT_SERVING_IMAGE
from midfill.api.trainingrun import DEFAULT_TRAINER_IMAGE
from midfill.settings import CoreSettings


class OperatorSettings(CoreSettings):
    """How the operator watches the cluster and what it puts into the objects it creates."""

    model_config = SettingsConfigDict(env_prefix="MIDFILL_", extra="ignore")

    watch_namespaces: str = Field(
        default="",
        description="Comma-separated namespaces to watch (env MIDFILL_WATCH_NAMESPACES). Empty = cluster-wide.",
    )
    watch_server_timeout: int = Field(
        default=300,
        ge=1,
        description="Seconds the API server keeps one watch open before ending it (kopf #585: without a "
        "timeout a silently broken stream is never noticed). Default 300.",
    )
    watch_client_timeout: int = Field(
        default=330,
        ge=1,
        description="Seconds the operator waits on one watch before reconnecting; keep above the server "
        "timeout. Default 330.",
    )
    peering_name: str = Field(
        default="midfill",
        description="kopf peering object: of several replicas only the one with the highest priority acts. "
        "Default midfill.",
    )
    standalone: bool = Field(default=False, description="Run without peering (a single replica). Default false.")
    health_port: int = Field(
        default=8080, ge=1, le=65535, description="Port of the liveness endpoint /healthz. Default 8080."
    )
    resync_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often each active resource is re-checked against the cluster and MLflow (progress, "
        "start-up timeout, registry aliases). Handlers are edge-triggered; this timer checks actual state. Default 30.",
    )
    trainer_image: str = Field(
        default=DEFAULT_TRAINER_IMAGE,
        description="Trainer image used when a TrainingRun leaves spec.image at its default.",
    )
    serving_image: str = Field(
        default=DEFAULT_SERVING_IMAGE,
        description="Serving image used when a ModelRelease leaves spec.endpoint.image at its default.",
    )
    checkpoint_claim_name: str | None = Field(
        default=None,
        description="A ReadWriteMany PersistentVolumeClaim mounted into every training pod at checkpointMountPath; "
        "runs without spec.checkpoint.uri keep checkpoints in <mount>/<namespace>/<run>, so a restarted attempt "
        "resumes. Default: none (set spec.checkpoint.uri to an object-store URI instead).",
    )
    checkpoint_mount_path: str = Field(
        default="/checkpoints", description="Where that claim is mounted. Default /checkpoints."
    )
    endpoint_health_url: str = Field(
        default="http://{service}.{namespace}.svc.cluster.local:8000{route_prefix}/health",
        description="Where the operator reads what a release's endpoint serves (the replicas' /health, through "
        "KubeRay's serve Service): a template of {service} (<endpoint>-serve-svc), {namespace}, {route_prefix}. "
        "A version is Available only once this reports it. Default: the Service's cluster DNS name, port 8000.",
    )
    endpoint_health_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to wait for that /health answer (else: not served yet). Default 5."
    )
    tracking_secret: str | None = Field(
        default=None,
        description="A Secret (in each training namespace) with the keys username and password: the trainers' "
        "MLflow credentials, given to every trainer pod as MLFLOW_TRACKING_USERNAME/PASSWORD. Default: none.",
    )
    keep_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts of a TrainingRun whose Job and ConfigMap are kept (the newest); older ones are "
        "deleted, and status.attempts keeps their Job name and MLflow run id. Default 3.",
    )
    master_port: int = Field(
        default=29500, ge=1, le=65535, description="torchrun rendezvous port (PET_MASTER_PORT). Default 29500."
    )

    @field_validator("watch_namespaces")
    @classmethod
    def _namespaces(cls, value: str) -> str:
        return ",".join(ns.strip() for ns in value.split(",") if ns.strip())

    def namespaces(self) -> list[str]:
        """The watched namespaces; [] = cluster-wide."""
        return [ns for ns in self.watch_namespaces.split(",") if ns]
