"""The small progress record rank 0 of a training job writes, and the CLI/operator read.

Locally it is a JSON file in the run's checkpoint folder; on a cluster the same numbers go to the
MLflow run (tagged with the TrainingRun uid), where the operator reads them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

PROGRESS_FILE = "progress.json"
RESULT_FILE = "result.json"
# Tag on the MLflow *run* so the operator can find the run of a TrainingRun attempt.
RUN_TAG_UID = "midfill.training_run_uid"
RUN_TAG_ATTEMPT = "midfill.attempt"
# The URI of the newest committed checkpoint, set on the MLflow run with the metric `checkpoint_step`.
RUN_TAG_CHECKPOINT = "midfill.checkpoint_uri"


class ProgressRecord(BaseModel):
    """Where a training job is: written atomically by rank 0 every log interval."""

    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    tokens_per_second_per_device: float | None = None
    mfu: float | None = Field(
        default=None, description="Model FLOPs utilisation (0-1); None where the peak is unknown."
    )
    update_time: str | None = None
    attempt: int | None = None
    checkpoint_uri: str | None = Field(default=None, description="Newest complete checkpoint.")
    checkpoint_step: int | None = None
    checkpoint_time: str | None = None
    mlflow_run_id: str | None = None


class TrainingResult(BaseModel):
    """Written by rank 0 after the model is exported and registered (the job's outcome)."""

    registered_model_name: str
    version: str
    uri: str
    export_uri: str
    mlflow_run_id: str | None = None


def write_json_atomic(path: str | Path, data: BaseModel) -> None:
    """Write JSON so that readers see the old or the new content, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(data.model_dump_json(indent=2, exclude_none=True))
    os.replace(tmp, path)


def read_progress(folder: str | Path) -> ProgressRecord | None:
    """The progress record in a run folder, or None if there is none (yet) or it is unreadable."""
    return _read(Path(folder) / PROGRESS_FILE, ProgressRecord)


def read_result(folder: str | Path) -> TrainingResult | None:
    """The result record in a run folder, or None."""
    return _read(Path(folder) / RESULT_FILE, TrainingResult)


def _read(path: Path, model: type[BaseModel]):
    try:
        return model.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
