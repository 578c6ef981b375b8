"""Pieces shared by both custom resources: the base model, metadata, conditions, scheduling types."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

GROUP = "midfill.dev"
VERSION = "v1alpha1"
# Spelled out (not f"{GROUP}/{VERSION}") so type checkers see the Literal the resource models declare.
API_VERSION: Final = "midfill.dev/v1alpha1"

# RFC 1035 label: child objects (Service, Job "<name>-a<N>") reuse the name, so it must be a
# valid Service name with room left for the attempt suffix.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 52
QUANTITY_PATTERN = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[munkMGTPE]|k)?$"


class ApiModel(BaseModel):
    """Base for every spec/status object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, no unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ObjectMeta(BaseModel):
    """The subset of Kubernetes ObjectMeta midfill reads; other keys are kept as they are."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(
        description="Resource name: lowercase letters, digits and '-', starting with a letter; "
        f"at most {MAX_NAME_LENGTH} characters (child objects append '-a<N>').",
    )
    namespace: str | None = Field(default=None, description="Namespace (default: the current one).")
    uid: str | None = Field(default=None, description="Set by the API server (or the local backend).")
    generation: int | None = Field(default=None, description="Set by the API server on spec changes.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        if len(name) > MAX_NAME_LENGTH or not re.match(NAME_PATTERN, name):
            raise ValueError(
                f"{name!r} must be at most {MAX_NAME_LENGTH} lowercase letters, digits or '-', starting "
                "with a letter and ending with a letter or digit (it names Services and Jobs), e.g. fim-debug"
            )
        return name


Quantity = int | str
"""A Kubernetes quantity such as `4`, `500m`, `16Gi`."""


class ResourceRequirements(ApiModel):
    """Container resources, as in a Pod spec (`nvidia.com/gpu` goes in limits)."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="Minimum resources, e.g. {cpu: 8, memory: 64Gi}. Default: none."
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Maximum resources, e.g. {nvidia.com/gpu: 8, memory: 200Gi}. Default: none.",
    )

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict[str, Quantity]) -> dict[str, Quantity]:
        for key, quantity in value.items():
            if isinstance(quantity, bool) or not re.match(QUANTITY_PATTERN, str(quantity)):
                raise ValueError(f"{key}: {quantity!r} is not a Kubernetes quantity (examples: 4, 500m, 16Gi)")
        return value

    def gpus(self) -> int:
        """GPUs per node asked for in limits (or requests), 0 when none."""
        raw = self.limits.get("nvidia.com/gpu", self.requests.get("nvidia.com/gpu", 0))
        return int(raw)


class Toleration(ApiModel):
    """A Pod toleration (see the Kubernetes docs on taints and tolerations)."""

    key: str | None = Field(default=None, description="Taint key to tolerate; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal. Default Equal.")
    value: str | None = Field(default=None, description="Taint value (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="With NoExecute: how long the pod stays bound after the taint appears."
    )


class NodePool(ApiModel):
    """Where pods may run: the GPU node pool of a cluster."""

    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the pods require, e.g. {cloud.google.com/gke-accelerator: nvidia-h100-80gb}.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for the pool's taints, e.g. nvidia.com/gpu=present:NoSchedule."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="A Pod affinity object, passed through as written. Default: none."
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A Kubernetes-style condition (same shape as metav1.Condition)."""

    type: str = Field(description="Condition type, e.g. Running, Succeeded, Available.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this condition was computed from."
    )


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes it (second precision, trailing Z)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition],
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
    now: str | None = None,
) -> list[Condition]:
    """Return `conditions` with `type` set; lastTransitionTime moves only when the status flips.

    Pure (returns a new list) so reconcile code can compare old and new status and write only on
    change.
    """
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type:
            out.append(cond)
            continue
        found = True
        transition = cond.last_transition_time if cond.status == status else (now or now_rfc3339())
        out.append(
            Condition(
                type=type,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=transition,
                observed_generation=observed_generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now or now_rfc3339(),
                observed_generation=observed_generation,
            )
        )
    return out


def get_condition(conditions: list[Condition], type: str) -> Condition | None:
    """The condition of that type, or None."""
    return next((c for c in conditions if c.type == type), None)
