"""Per-process serving settings (environment, MIDFILL_ prefix). What a release asks for lives in
midfill.serve_args.ServeArgs; these are the knobs of the process that serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from midfill.settings import CoreSettings


class ServingSettings(CoreSettings):
    """Env: MIDFILL_SERVE_DTYPE, MIDFILL_SERVE_TORCH_THREADS, MIDFILL_SERVE_MODEL_CACHE,
    MIDFILL_SERVE_LOAD_TIMEOUT_S, MIDFILL_API_KEY."""

    serve_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Weights and activations dtype. bfloat16 speeds up prompt processing on CPUs with AMX/avx512_bf16."
    )
    serve_torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per replica (default: the replica's num_cpus)."
    )
    serve_model_cache: Path | None = Field(
        default=None, description="Where models:/ URIs are downloaded (default: <state_dir>/models)."
    )
    serve_load_timeout_s: float = Field(
        default=600, gt=0, description="How long a request waits for a replica that is still loading its model before a 503."
    )
    api_key: str | None = Field(default=None, description="Key `midfill complete` sends (env MIDFILL_API_KEY).")

    def model_cache(self) -> Path:
        return self.serve_model_cache or (self.state_dir / "models")
