"""Typed arguments of the Ray Serve application (`serving.app:build_app`).

They live in the core because two components produce them without importing serving: the
operator (into a RayService's serveConfigV2) and the local backend (`midfill apply`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from midfill.api.modelrelease import ModelRelease

# Settings a running replica takes without reloading the model: they travel in the deployment's
# Ray Serve user_config and reach InfillServer.reconfigure(). Ray hashes an application's args into
# its code version, so anything left in the args replaces the replicas when it changes.
RELOADABLE = (
    "max_new_tokens",
    "max_batch_size",
    "max_prefill_tokens",
    "prefix_cache_tokens",
    "max_queued_requests",
    "api_keys_file",
    "api_keys_env",
    "auth_disabled",
)
# Reloadable, yet also needed when a replica starts, so they stay in the init args too.
KEY_SETTINGS = ("api_keys_file", "api_keys_env", "auth_disabled")
# The environment of every Ray process of an endpoint (`midfill serve`, the local backend, a
# RayService's pods): Ray's HTTP proxy loads serving.proxy's middleware, which answers a request
# whose replica died under it with a retryable 503 (or a final error event on a stream) instead of
# Ray's bare 500 or a cut stream.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serving.proxy:middlewares"}
# The canary router's settings (serving.canary): the model replicas never see them, and the weight
# travels in the router's user_config only, so a new step reconfigures the router and nothing else.
ROUTER_SETTINGS = ("router", "canary_model_uri", "canary_weight")


class ServeArgs(BaseModel):
    """Everything build_app needs; serialisable to the JSON/YAML of a Serve config."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field(description="models:/name/3, models:/name@alias, or a local export folder.")
    tracking_uri: str | None = Field(
        default=None, description="MLflow URI for models:/ URIs (default: MIDFILL_TRACKING_URI)."
    )
    served_model_name: str | None = Field(
        default=None, description="Name reported by /v1/models (default: the registered model name)."
    )
    route_prefix: str = "/"
    max_context_tokens: int | None = Field(default=None, ge=16, description="Default: the model's max_context.")
    max_new_tokens: int = Field(default=256, ge=1)
    fim_format: Literal["codegen2", "starcoder"] | None = None
    max_batch_size: int = Field(default=16, ge=1)
    max_prefill_tokens: int = Field(
        default=2048,
        ge=1,
        description="Prompt tokens prefilled together per step (padded to the longest on the dynamic path).",
    )
    prefix_cache_tokens: int = Field(
        default=8192, ge=0, description="Recent prompt tokens kept for reuse (0 disables)."
    )
    # Ray Serve deployment options
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)
    upscale_delay_s: float = Field(default=30, ge=0)
    downscale_delay_s: float = Field(default=600, ge=0)
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=-1)
    num_cpus: float = Field(default=1, gt=0, description="CPUs per replica.")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per replica.")
    # Auth: keys come from a file (a mounted Secret) or an environment variable; never inline.
    api_keys_file: str | None = Field(
        default=None,
        description="Named keys file (midfill.apikeys): NAME sha256:DIGEST [rpm=N] [tpm=N] per line; re-read "
        "every few seconds.",
    )
    api_keys_env: str | None = Field(
        default=None, description="Environment variable holding keys (comma or newline separated)."
    )
    auth_disabled: bool = Field(default=False, description="Serve without auth (must be explicit).")
    # Canary (spec.rollout.strategy: Canary): a router in front of a stable and a canary deployment.
    router: bool = Field(
        default=False, description="Serve through the canary router (stable + optional canary deployment)."
    )
    canary_model_uri: str | None = Field(default=None, description="The canary's model (router only).")
    canary_weight: int = Field(default=0, ge=0, le=100, description="Percent of traffic to the canary.")

    @model_validator(mode="after")
    def _auth_explicit(self) -> ServeArgs:
        if not self.auth_disabled and not (self.api_keys_file or self.api_keys_env):
            raise ValueError("auth: give api_keys_file or api_keys_env, or set auth_disabled: true")
        if self.canary_model_uri is not None and not self.router:
            raise ValueError("canary_model_uri: a canary needs router: true")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self

    @classmethod
    def for_release(
        cls,
        release: ModelRelease,
        *,
        model_uri: str,
        tracking_uri: str | None,
        api_keys_file: str | None = None,
        api_keys_env: str | None = None,
        canary_model_uri: str | None = None,
        canary_weight: int = 0,
    ) -> ServeArgs:
        """Args for serving `model_uri` as a ModelRelease asks (one mapping, used by both backends)."""
        spec = release.spec
        gpus = spec.endpoint.resources_per_replica.gpus()
        cpu = spec.endpoint.resources_per_replica.requests.get("cpu", 1)
        return cls(
            model_uri=model_uri,
            tracking_uri=tracking_uri,
            served_model_name=spec.model.registered_model_name,
            route_prefix=spec.endpoint.route_prefix,
            max_context_tokens=spec.serving.max_context_tokens,
            max_new_tokens=spec.serving.max_new_tokens,
            fim_format=spec.serving.fim_format,
            max_batch_size=spec.serving.max_batch_size,
            max_prefill_tokens=spec.serving.max_prefill_tokens,
            prefix_cache_tokens=spec.serving.prefix_cache_tokens,
            min_replicas=spec.autoscaling.min_replicas,
            max_replicas=spec.autoscaling.max_replicas,
            target_ongoing_requests=spec.autoscaling.target_ongoing_requests,
            upscale_delay_s=spec.autoscaling.upscale_delay_seconds,
            downscale_delay_s=spec.autoscaling.downscale_delay_seconds,
            max_ongoing_requests=spec.serving.max_ongoing_requests,
            max_queued_requests=spec.serving.max_queued_requests,
            num_cpus=_cpu_count(cpu),
            num_gpus=float(gpus),
            api_keys_file=api_keys_file,
            api_keys_env=api_keys_env,
            auth_disabled=spec.auth.disabled,
            router=spec.rollout.strategy == "Canary",
            canary_model_uri=canary_model_uri,
            canary_weight=canary_weight,
        )


def _cpu_count(quantity: int | str) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
