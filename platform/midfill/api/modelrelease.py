"""The ModelRelease custom resource: "serve the approved version of this model at this endpoint"."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from midfill.api.common import API_VERSION, ApiModel, Condition, NodePool, ObjectMeta, ResourceRequirements
from midfill.api.pods import PodTemplate

DEFAULT_ALIAS = "champion"
DEFAULT_SERVING_IMAGE = "ghcr.io/midfill/serving:0.1.0"
FimFormatName = Literal["codegen2", "starcoder"]


class ModelRef(ApiModel):
    """Which registered model version to serve: follow an alias, or pin a version."""

    registered_model_name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="MLflow registered model name."
    )
    alias: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        description=f"Follow this registry alias (default {DEFAULT_ALIAS} when no version is given).",
    )
    version: int | None = Field(default=None, ge=1, description="Pin this version instead of following an alias.")

    @model_validator(mode="after")
    def _alias_xor_version(self) -> ModelRef:
        if self.alias is not None and self.version is not None:
            raise ValueError(
                f"version: set alias ({self.alias!r}) or version ({self.version}), not both: an alias follows "
                "approvals, a version pins one model"
            )
        return self

    def effective_alias(self) -> str | None:
        """The alias to resolve, or None when a version is pinned."""
        if self.version is not None:
            return None
        return self.alias or DEFAULT_ALIAS


# Evaluation metrics a release may require (higher is better); `midfill eval` records them.
GATE_METRICS = ("pass@1", "exact_match", "first_line_exact_match", "stop_rate")
EVAL_SUITES = ("humaneval-single-line", "humaneval-multi-line", "line-em", "left-to-right")


class Approval(ApiModel):
    """What a model version must carry before it is served (set by a reviewer in MLflow)."""

    required_alias: str | None = Field(
        default=None, description="The version must also hold this alias (e.g. champion). Default: none."
    )
    required_tags: dict[str, str] = Field(
        default_factory=lambda: {"review": "approved"},
        description="Tags the version must have with these values. Default {review: approved}.",
    )
    min_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Evaluation floors, 'suite/metric': value, e.g. {humaneval-single-line/pass@1: 0.05}; "
        "a version below (or not evaluated) is not promoted. Default: none.",
    )

    @field_validator("min_metrics")
    @classmethod
    def _metric_keys(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            suite, _, metric = key.partition("/")
            if suite not in EVAL_SUITES or metric not in GATE_METRICS:
                raise ValueError(
                    f"{key!r} is not 'suite/metric'; suites: {', '.join(EVAL_SUITES)}; metrics: "
                    f"{', '.join(GATE_METRICS)}"
                )
        return value


class EndpointSpec(ApiModel):
    """The HTTP endpoint and the replicas behind it."""

    name: str | None = Field(default=None, description="Endpoint (RayService) name. Default: the ModelRelease's name.")
    route_prefix: str = Field(default="/", pattern=r"^/", description="HTTP route prefix. Default /.")
    image: str = Field(
        default=DEFAULT_SERVING_IMAGE, min_length=1, description=f"Serving image. Default {DEFAULT_SERVING_IMAGE}."
    )
    resources_per_replica: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Resources per model replica (e.g. nvidia.com/gpu: 1)."
    )
    node_pool: NodePool = Field(default_factory=NodePool, description="Where replicas run.")
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate,
        description="Added to the Ray head and worker pods: service account, env/envFrom, imagePullSecrets, "
        "volumes and mounts, labels/annotations, securityContext.",
    )


class ServingSpec(ApiModel):
    """Request limits and prompt format."""

    max_context_tokens: int | None = Field(
        default=None, ge=16, description="Longest prompt + completion accepted. Default: the model's context."
    )
    max_new_tokens: int = Field(
        default=256, ge=1, le=32768, description="Upper bound on max_tokens per request. Default 256."
    )
    fim_format: FimFormatName | None = Field(
        default=None, description="Override the model's FIM format (from midfill.json). Default: the model's."
    )
    max_batch_size: int = Field(
        default=16, ge=1, le=512, description="Requests decoded together per replica. Default 16."
    )
    max_prefill_tokens: int = Field(
        default=2048,
        ge=1,
        le=1048576,
        description=(
            "Prompt tokens (padded) prefilled together in one step; larger groups raise throughput but stall "
            "running streams longer. A longer prompt is still prefilled, alone. Default 2048."
        ),
    )
    prefix_cache_tokens: int = Field(
        default=8192,
        ge=0,
        le=16777216,
        description=(
            "Prompt tokens of recent requests whose keys/values are kept per replica, so a prompt that starts "
            "like a recent one (an editor resending the file as the user types) prefills only the rest. "
            "0 disables. Default 8192."
        ),
    )
    max_ongoing_requests: int = Field(
        default=64,
        ge=1,
        description="Concurrent requests per replica (Ray Serve); keep above expected concurrency. Default 64.",
    )
    max_queued_requests: int = Field(
        default=256, ge=-1, description="Requests waiting beyond that get HTTP 429 (-1 = unbounded). Default 256."
    )


class AutoscalingSpec(ApiModel):
    """Ray Serve autoscaling of replicas."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas (0 allows scale to zero). Default 1.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas. Default 1.")
    target_ongoing_requests: float = Field(
        default=8, gt=0, description="Ongoing requests per replica to aim for. Default 8."
    )
    upscale_delay_seconds: float = Field(
        default=30, ge=0, description="How long load must stay high before scaling up. Default 30."
    )
    downscale_delay_seconds: float = Field(
        default=600, ge=0, description="How long load must stay low before scaling down. Default 600."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas: {self.min_replicas} must be <= maxReplicas ({self.max_replicas})")
        return self


class SecretKeyRef(ApiModel):
    """A key in a Secret of the release's namespace."""

    name: str = Field(min_length=1, description="Secret name.")
    key: str = Field(
        default="api-keys", min_length=1, description="Key holding the API keys, one per line. Default api-keys."
    )


class AuthSpec(ApiModel):
    """API-key authentication of the endpoint."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret with the accepted API keys (one per line)."
    )
    disabled: bool = Field(
        default=False, description="Serve without authentication. Must be set explicitly. Default false."
    )

    @model_validator(mode="after")
    def _explicit(self) -> AuthSpec:
        if self.disabled and self.api_key_secret_ref is not None:
            raise ValueError("disabled: set apiKeySecretRef or disabled: true, not both")
        return self


class CanarySpec(ApiModel):
    """How a canary is judged at each step, on the live numbers of the replicas serving it."""

    step_seconds: int = Field(
        default=300, ge=1, description="How long each canary step is held before it may advance. Default 300."
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        description="Canary requests a step needs before it is judged (fewer: the step is held). Default 20.",
    )
    max_error_rate: float = Field(
        default=0.02, ge=0, le=1, description="Most server errors (5xx) per canary request. Default 0.02."
    )
    max_p95_latency_ms: float | None = Field(
        default=None, gt=0, description="Highest 95th-percentile request latency of the canary. Default: unchecked."
    )
    min_own_stop_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Fewest completions that end on their own (finish_reason stop, not the token limit). "
        "Default: unchecked.",
    )
    max_mean_completion_tokens: float | None = Field(
        default=None, gt=0, description="Longest mean completion (tokens) of the canary. Default: unchecked."
    )


class RolloutSpec(ApiModel):
    """How a newly approved version replaces the serving one."""

    strategy: Literal["InPlace", "Canary"] = Field(
        default="InPlace",
        description="InPlace swaps the model inside the running cluster (no second cluster, no 2x GPUs), "
        "with automatic rollback. Canary serves the new version beside the stable one on the steps of "
        "canarySteps (sticky per API key or `user`), judged on live numbers (rollout.canary), promoted at "
        "100% or rolled back to 0% on a breach; its replicas come from the autoscaling bounds. Default InPlace.",
    )
    canary_steps: list[int] = Field(
        default_factory=lambda: [10, 50, 100],
        description="Canary traffic percentages, increasing, ending at 100 (strategy Canary). Default [10, 50, 100].",
    )
    canary: CanarySpec = Field(
        default_factory=CanarySpec, description="Hold time and thresholds of each canary step (strategy Canary)."
    )
    auto_rollback: bool = Field(
        default=True,
        description="Return to the previous stable version if the new one is not healthy in time. Default true.",
    )
    health_deadline_seconds: int = Field(
        default=600, ge=10, description="How long a new version may take to become healthy. Default 600."
    )

    @model_validator(mode="after")
    def _steps(self) -> RolloutSpec:
        steps = self.canary_steps
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError(
                f"canarySteps: {steps} must be increasing percentages in 1..100 ending at 100, e.g. [10, 50, 100]"
            )
        return self


class ModelReleaseSpec(ApiModel):
    """Desired state of a ModelRelease."""

    model: ModelRef = Field(description="The registered model and alias or version to serve.")
    approval: Approval = Field(default_factory=Approval, description="Review requirements.")
    endpoint: EndpointSpec = Field(
        default_factory=EndpointSpec, description="Endpoint name, image, replicas' resources."
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="Request limits and prompt format.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica autoscaling.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API keys (required unless disabled: true).")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="How new versions roll out.")
    paused: bool = Field(
        default=False, description="true freezes the served version (no changes are rolled out). Default false."
    )

    @model_validator(mode="after")
    def _auth_explicit(self) -> ModelReleaseSpec:
        if self.auth.api_key_secret_ref is None and not self.auth.disabled:
            raise ValueError(
                "auth: set auth.apiKeySecretRef (a Secret with API keys) or auth.disabled: true to serve "
                "without authentication"
            )
        return self


ModelReleasePhase = Literal["Pending", "WaitingForApproval", "Progressing", "Available", "Degraded", "Paused", "Failed"]


class CanaryNumbers(ApiModel):
    """One version's live numbers, as the endpoint counted them since the current split was set."""

    requests: int = Field(default=0, ge=0, description="Completion requests answered.")
    errors: int = Field(default=0, ge=0, description="Requests answered with a server error (5xx).")
    error_rate: float | None = Field(default=None, description="errors / requests.")
    p95_latency_ms: float | None = Field(default=None, description="95th-percentile request latency.")
    own_stop_rate: float | None = Field(
        default=None, description="Completions that ended on their own (finish_reason stop)."
    )
    mean_completion_tokens: float | None = Field(default=None, description="Mean completion length in tokens.")


class CanaryStatus(ApiModel):
    """Where the canary stands: version, step, weight, and the numbers it was last judged on."""

    version: str = Field(description="The version on canary.")
    state: Literal["Running", "Promoted", "RolledBack"] = Field(
        default="Running", description="Running (taking steps), Promoted (became stable) or RolledBack (0%)."
    )
    step: int = Field(default=0, ge=0, description="Index of the current step in spec.rollout.canarySteps.")
    weight: int = Field(default=0, ge=0, le=100, description="Percent of traffic routed to the canary now.")
    step_started: str | None = Field(default=None, description="When the current step began (RFC 3339).")
    canary_numbers: CanaryNumbers | None = Field(default=None, description="The canary's last judged numbers.")
    stable_numbers: CanaryNumbers | None = Field(default=None, description="The stable version's numbers then.")
    verdict: str | None = Field(default=None, description="The last judgement, naming the number that decided it.")


class ModelReleaseStatus(ApiModel):
    """Observed state of a ModelRelease."""

    phase: ModelReleasePhase = Field(
        default="Pending",
        description="Pending, WaitingForApproval, Progressing, Available, Degraded, Paused or Failed.",
    )
    message: str | None = Field(default=None, description="One line on what is happening or what it waits for.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="ModelResolved, Approved, Progressing, Available, Degraded, RolledBack.",
    )
    resolved_version: str | None = Field(default=None, description="Version the alias/version resolves to now.")
    stable_version: str | None = Field(default=None, description="Version serving traffic and healthy.")
    previous_stable_version: str | None = Field(
        default=None, description="Version served before the stable one (rollback target)."
    )
    url: str | None = Field(default=None, description="Base URL of the OpenAI-compatible endpoint.")
    canary: CanaryStatus | None = Field(default=None, description="The canary rollout (strategy Canary).")
    observed_generation: int | None = Field(default=None, description="The spec generation this status reflects.")


class ModelRelease(ApiModel):
    """A ModelRelease resource (midfill.dev/v1alpha1)."""

    api_version: Literal["midfill.dev/v1alpha1"] = Field(default=API_VERSION, description="midfill.dev/v1alpha1")
    kind: Literal["ModelRelease"] = Field(default="ModelRelease", description="ModelRelease")
    metadata: ObjectMeta
    spec: ModelReleaseSpec
    status: ModelReleaseStatus | None = None

    def endpoint_name(self) -> str:
        """The endpoint (RayService) name."""
        return self.spec.endpoint.name or self.metadata.name
