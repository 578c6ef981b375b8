"""What a platform team adds to every pod midfill creates: identity, credentials, configuration, mounts.

`spec.podTemplate` (TrainingRun: every trainer pod) and `spec.endpoint.podTemplate` (ModelRelease:
the Ray head and worker pods) merge these into the pods the builders write. Names the platform itself
uses (its env variables, volumes, mount paths, labels) are refused here, so a template can add to a
pod but never silently replace what the trainer or the server relies on.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from midfill.api.common import ApiModel

# Env variables the builders set on trainer and serving containers (a test keeps this in step with them).
RESERVED_ENV = frozenset(
    {
        "MIDFILL_RUN_UID",
        "MIDFILL_ATTEMPT",
        "MIDFILL_STATE_DIR",
        "MIDFILL_PROGRESS_BAR",
        "MIDFILL_TRACKING_URI",
        "MIDFILL_CHECKPOINT_DIR",
    }
)
RESERVED_ENV_PREFIX = "PET_"  # torchrun's settings (rendezvous, ranks): the gang's contract
# Volumes the builders add (run file, shared memory, work dir, checkpoint claim, API keys).
RESERVED_VOLUMES = frozenset({"config", "dshm", "work", "checkpoints", "api-keys"})
# Mount paths the builders use; a template mount at or under one would hide the platform's files.
RESERVED_MOUNT_PATHS = ("/etc/midfill", "/var/midfill", "/dev/shm")
RESERVED_LABEL_PREFIXES = (
    "midfill.dev/",
    "app.kubernetes.io/managed-by",
    "kueue.x-k8s.io/",
    "ray.io/",
    "batch.kubernetes.io/",
    "job-name",
    "controller-uid",
)
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
VOLUME_SOURCES = ("persistent_volume_claim", "secret", "config_map", "empty_dir", "csi", "projected", "ephemeral")


def _dns_subdomain(value: str | None, what: str) -> str | None:
    if value is not None and (len(value) > 253 or not DNS_SUBDOMAIN.match(value)):
        raise ValueError(f"{value!r} is not a valid {what} name (lowercase letters, digits, '-' and '.')")
    return value


class EnvVar(ApiModel):
    """An environment variable: a literal value, or a reference (as a Pod's env[].valueFrom)."""

    name: str = Field(min_length=1, description="Variable name, e.g. AWS_REGION.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="A Pod EnvVarSource: secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef, as written.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name (letters, digits, '_', '-', '.')")
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(
                f"{name!r} is set by midfill itself (MIDFILL_* run settings, PET_* torchrun rendezvous); "
                "set the matching spec field instead, or use another name"
            )
        return name

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"valueFrom: {self.name} has both value and valueFrom; keep one")
        return self


class NamedRef(ApiModel):
    """A reference to a Secret or ConfigMap in the resource's namespace."""

    name: str = Field(min_length=1, description="Its name.")
    optional: bool | None = Field(default=None, description="Start the pod even if it is missing. Default false.")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return _dns_subdomain(name, "Secret/ConfigMap") or name


class EnvFromSource(ApiModel):
    """Every key of a Secret or ConfigMap as environment variables (e.g. AWS_ACCESS_KEY_ID from a Secret)."""

    secret_ref: NamedRef | None = Field(default=None, description="The Secret to read.")
    config_map_ref: NamedRef | None = Field(default=None, description="The ConfigMap to read.")
    prefix: str | None = Field(default=None, description="Prepended to every key. Default: none.")

    @model_validator(mode="after")
    def _one_ref(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("secretRef: set exactly one of secretRef and configMapRef")
        if self.prefix and (self.prefix.startswith(RESERVED_ENV_PREFIX) or self.prefix.startswith("MIDFILL_")):
            raise ValueError(
                f"prefix: {self.prefix!r} could override midfill's own PET_*/MIDFILL_* variables; use another"
            )
        return self


class Volume(ApiModel):
    """An extra pod volume; exactly one source, written as in a Pod spec."""

    name: str = Field(description="Volume name (referenced by volumeMounts).")
    persistent_volume_claim: dict[str, Any] | None = Field(default=None, description="{claimName, readOnly}.")
    secret: dict[str, Any] | None = Field(default=None, description="{secretName, items, defaultMode}.")
    config_map: dict[str, Any] | None = Field(default=None, description="{name, items, defaultMode}.")
    empty_dir: dict[str, Any] | None = Field(default=None, description="{medium, sizeLimit}.")
    csi: dict[str, Any] | None = Field(
        default=None, description="A CSI volume (e.g. a bucket or secrets-store driver)."
    )
    projected: dict[str, Any] | None = Field(
        default=None, description="A projected volume (e.g. a service account token)."
    )
    ephemeral: dict[str, Any] | None = Field(default=None, description="A generic ephemeral volume.")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if len(name) > 63 or not DNS_LABEL.match(name):
            raise ValueError(f"{name!r} is not a volume name (at most 63 lowercase letters, digits or '-')")
        if name in RESERVED_VOLUMES:
            raise ValueError(
                f"{name!r} is a volume midfill adds itself ({', '.join(sorted(RESERVED_VOLUMES))}); pick another name"
            )
        return name

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        if sum(getattr(self, s) is not None for s in VOLUME_SOURCES) != 1:
            raise ValueError(
                f"name: volume {self.name!r} needs exactly one source: persistentVolumeClaim, secret, configMap, "
                "emptyDir, csi, projected or ephemeral"
            )
        return self


class VolumeMount(ApiModel):
    """Where a template volume appears in the container."""

    name: str = Field(min_length=1, description="A volume of podTemplate.volumes.")
    mount_path: str = Field(pattern=r"^/", description="Absolute path in the container.")
    sub_path: str | None = Field(default=None, description="Mount this path inside the volume. Default: its root.")
    read_only: bool | None = Field(default=None, description="Mount read-only. Default false.")

    @field_validator("mount_path")
    @classmethod
    def _path(cls, path: str) -> str:
        clean = path.rstrip("/") or "/"
        for reserved in RESERVED_MOUNT_PATHS:
            if clean == reserved or clean.startswith(reserved + "/") or reserved.startswith(clean.rstrip("/") + "/"):
                raise ValueError(f"{path!r} overlaps {reserved}, where midfill mounts its own files; mount elsewhere")
        return path


class PodTemplate(ApiModel):
    """Additions to the pods midfill creates (identity, credentials, configuration, mounts, metadata)."""

    service_account_name: str | None = Field(
        default=None,
        description="ServiceAccount the pods run as, e.g. one bound to a cloud role (workload identity). "
        "Default: the namespace's default.",
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables. Default: none.")
    env_from: list[EnvFromSource] = Field(
        default_factory=list, description="Secrets/ConfigMaps whose keys become env variables. Default: none."
    )
    image_pull_secrets: list[NamedRef] = Field(
        default_factory=list, description="Secrets used to pull a private image. Default: none."
    )
    volumes: list[Volume] = Field(default_factory=list, description="Extra volumes. Default: none.")
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, description="Mounts of those volumes in the main container. Default: none."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels. Default: none.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations. Default: none.")
    security_context: dict[str, Any] | None = Field(
        default=None, description="A PodSecurityContext (runAsUser, fsGroup, ...), as written. Default: none."
    )
    container_security_context: dict[str, Any] | None = Field(
        default=None, description="A container SecurityContext for midfill's containers, as written. Default: none."
    )

    @field_validator("service_account_name")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        return _dns_subdomain(value, "ServiceAccount")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(
                    f"{key!r} is a label midfill, Kueue, KubeRay or the Job controller set; use another key"
                )
        return value

    @model_validator(mode="after")
    def _mounts_name_volumes(self) -> PodTemplate:
        names = [v.name for v in self.volumes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"volumes: {', '.join(dupes)} named more than once")
        for i, mount in enumerate(self.volume_mounts):
            if mount.name not in names:
                raise ValueError(f"volumeMounts[{i}].name: {mount.name!r} is not in podTemplate.volumes; add it there")
        envs = [e.name for e in self.env]
        dupes = sorted({n for n in envs if envs.count(n) > 1})
        if dupes:
            raise ValueError(f"env: {', '.join(dupes)} set more than once")
        return self

    def mounts_path(self, path: str) -> bool:
        """True when `path` lies in one of the template's mounts (e.g. a checkpoint folder on a shared volume)."""
        for mount in self.volume_mounts:
            root = mount.mount_path.rstrip("/")
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def apply(self, pod: dict[str, Any], metadata: dict[str, Any], *, containers: list[dict[str, Any]]) -> None:
        """Merge into a pod spec (and its template metadata); `containers` get env, envFrom and mounts."""
        if self.service_account_name:
            pod["serviceAccountName"] = self.service_account_name
        if self.image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": r.name} for r in self.image_pull_secrets]
        if self.volumes:
            pod["volumes"] = [*pod.get("volumes", []), *(v.to_wire() for v in self.volumes)]
        if self.security_context:
            pod["securityContext"] = dict(self.security_context)
        for container in containers:
            if self.env:
                container["env"] = [*container.get("env", []), *(e.to_wire() for e in self.env)]
            if self.env_from:
                container["envFrom"] = [e.to_wire() for e in self.env_from]
            if self.volume_mounts:
                container["volumeMounts"] = [
                    *container.get("volumeMounts", []),
                    *(m.to_wire() for m in self.volume_mounts),
                ]
            if self.container_security_context:
                container["securityContext"] = dict(self.container_security_context)
        if self.labels:
            metadata["labels"] = {**self.labels, **metadata.get("labels", {})}
        if self.annotations:
            metadata["annotations"] = {**metadata.get("annotations", {}), **self.annotations}
