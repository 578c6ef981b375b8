"""Per-process serving settings (environment, MIDFILL_ prefix). What a release asks for lives in
midfill.serve_args.ServeArgs; these are the knobs of the process that serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from midfill.hardware import cpu_has_native_bf16
from midfill.settings import CoreSettings


def cpu_dtype() -> str:
    """The dtype `auto` means on this process's CPU: bfloat16 where the CPU has bfloat16 instructions."""
    return "bfloat16" if cpu_has_native_bf16() else "float32"


class ServingSettings(CoreSettings):
    """Env: MIDFILL_SERVE_DEVICE, MIDFILL_SERVE_DTYPE, MIDFILL_SERVE_DECODE_PATH, MIDFILL_SERVE_TORCH_THREADS,
    MIDFILL_SERVE_MODEL_CACHE, MIDFILL_API_KEY."""

    serve_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where the model runs: auto = the replica's GPU when it has one (num_gpus), else the CPU.",
    )
    serve_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Weights and activations dtype. auto = bfloat16 on a GPU with native bfloat16 (Ampere on; float16 on "
            "older ones) and on a CPU with bfloat16 instructions "
            "(avx512_bf16 or AMX; about twice float32's throughput there, docs/benchmarks.md), else float32. "
            "Greedy tokens can differ slightly between the two; float32 reproduces transformers' float32 generate."
        ),
    )
    serve_decode_path: Literal["auto", "static", "dynamic"] = Field(
        default="auto",
        description=(
            "Decode step: static = fixed shapes over buffers at the full context, replayed from CUDA graphs on a GPU "
            "(docs/serving.md); dynamic = buffers as wide as the rows need (faster on a CPU). auto = static on a GPU."
        ),
    )
    serve_torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per replica (default: the replica's num_cpus)."
    )
    serve_model_cache: Path | None = Field(
        default=None, description="Where models:/ URIs are downloaded (default: <state_dir>/models)."
    )
    api_key: str | None = Field(default=None, description="Key `midfill complete` sends (env MIDFILL_API_KEY).")

    def device_and_dtype(self) -> tuple[str, str]:
        """The resolved (device, dtype) for this process."""
        import torch

        device = self.serve_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("MIDFILL_SERVE_DEVICE=cuda but no CUDA GPU is visible to this replica (num_gpus: 0?)")
        dtype: str = self.serve_dtype
        if dtype == "auto" and device == "cuda":
            # GPUs before Ampere (T4, V100) only emulate bfloat16; float16 is native there (as vLLM picks).
            dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        elif dtype == "auto":
            dtype = cpu_dtype()
        return device, dtype

    def model_cache(self) -> Path:
        return self.serve_model_cache or (self.state_dir / "models")
