"""The observed state of a TrainingRun, written by the operator or the local backend through the
shared lifecycle (midfill.lifecycle.trainingrun)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from midfill.api.common import ApiModel, Condition

TrainingRunPhase = Literal["Pending", "Queued", "Starting", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class CheckpointRef(ApiModel):
    """The newest complete checkpoint."""

    uri: str = Field(description="Where it is.")
    step: int = Field(description="Optimizer step it holds.")
    time: str | None = Field(default=None, description="When it was written (RFC 3339).")


class Progress(ApiModel):
    """Latest training progress reported by rank 0."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(
        default=None, description="Steps planned: spec.training.steps or tokens, or what its timeBudgetMinutes fitted."
    )
    loss: float | None = Field(default=None, description="Latest training loss (nats/token).")
    tokens_per_second: float | None = Field(default=None, description="Training throughput over all processes.")
    tokens_per_second_per_device: float | None = Field(
        default=None, description="Training throughput of one process (GPU)."
    )
    mfu: float | None = Field(
        default=None, description="Model FLOPs utilisation, 0-1 (docs/trainer.md); unset where the peak is unknown."
    )
    update_time: str | None = Field(default=None, description="When this was reported (RFC 3339).")


class AttemptRecord(ApiModel):
    """One attempt of the run, kept after its Job and ConfigMap are cleaned up: where its logs are."""

    attempt: int = Field(description="Attempt number (1-based).")
    job_name: str = Field(description="The Job (locally: the torchx app) that ran it, <run>-a<N>.")
    mlflow_run_id: str | None = Field(default=None, description="The MLflow run it logged to (metrics, logs).")
    outcome: Literal["Succeeded", "Failed", "Killed"] | None = Field(
        default=None, description="How it ended: Succeeded, Failed, or Killed (superseded, suspended, deleted)."
    )
    reason: str | None = Field(default=None, description="Why it ended (the reason of the run's condition).")


class RegisteredModelRef(ApiModel):
    """The model version this run registered."""

    name: str = Field(description="Registered model name.")
    version: str = Field(description="Model version.")
    uri: str = Field(description="models:/<name>/<version>")


class TrainingRunStatus(ApiModel):
    """Observed state of a TrainingRun (written by the operator or the local backend)."""

    phase: TrainingRunPhase = Field(
        default="Pending", description="Pending, Queued, Starting, Running, Restarting, Suspended, Succeeded or Failed."
    )
    message: str | None = Field(default=None, description="One line on what is happening or went wrong.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Queued, PodsReady, Running, Restarting, Succeeded, Failed, ModelRegistered.",
    )
    attempt: int = Field(default=0, description="Current attempt (1-based; 0 before the first).")
    restart_count: int = Field(default=0, description="Failed attempts restarted so far.")
    active_job_name: str | None = Field(default=None, description="The Job running the current attempt.")
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the run succeeded or failed.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="Newest complete checkpoint.")
    progress: Progress | None = Field(default=None, description="Step, loss, throughput.")
    registered_model: RegisteredModelRef | None = Field(default=None, description="The registered model version.")
    attempts: list[AttemptRecord] = Field(
        default_factory=list,
        description="Every attempt, oldest first, with its Job name and MLflow run (kept after old Jobs are deleted).",
    )
    observed_generation: int | None = Field(default=None, description="The spec generation this status reflects.")
