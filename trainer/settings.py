"""Process settings of a training job (environment variables with the MIDFILL_ prefix).

Where a run's files live is decided here, in one place (`RunPaths.for_run`):

- run folder: ``MIDFILL_RUN_DIR`` if set, else ``<MIDFILL_STATE_DIR>/runs/<run name>``
  (state dir default ``./.midfill``). ``progress.json`` and ``result.json`` are written there.
- checkpoints: ``spec.checkpoint.uri`` if set, else ``MIDFILL_CHECKPOINT_DIR`` if set, else
  ``<run folder>/checkpoints``. The trained tokenizer is kept beside them (``<checkpoints>/tokenizer``)
  so every retry and every node uses the same one.
- export: ``MIDFILL_EXPORT_DIR`` if set, else ``<run folder>/export``; it is then logged to the
  MLflow run as the artifact folder ``model`` (the registered version's source).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from midfill.api import TrainingRun
from midfill.settings import CoreSettings


class TrainerSettings(CoreSettings):
    """Settings of one trainer process; the command line overrides uid and attempt."""

    model_config = SettingsConfigDict(env_prefix="MIDFILL_", extra="ignore")

    run_uid: str | None = Field(
        default=None,
        description="TrainingRun uid (env MIDFILL_RUN_UID). Default: metadata.uid, else a stable hash of the name.",
    )
    attempt: int = Field(default=1, ge=1, description="Attempt number, 1-based (env MIDFILL_ATTEMPT). Default 1.")
    run_dir: Path | None = Field(
        default=None,
        description="Run folder for progress.json/result.json (env MIDFILL_RUN_DIR). Default <state dir>/runs/<name>.",
    )
    checkpoint_dir: str | None = Field(
        default=None,
        description="Checkpoint folder when spec.checkpoint.uri is unset (env MIDFILL_CHECKPOINT_DIR). "
        "Default <run folder>/checkpoints.",
    )
    export_dir: Path | None = Field(
        default=None,
        description="Where the final export is written (env MIDFILL_EXPORT_DIR). Default <run folder>/export.",
    )
    progress_bar: bool | None = Field(
        default=None, description="Show a tqdm bar (env MIDFILL_PROGRESS_BAR). Default: when stderr is a terminal."
    )
    # Fault injection for the test of a crash between registration and result.json (never set in
    # production): that window is too short to hit from outside. Crashes at any other point are
    # tested by killing the process from outside (tests/trainer/outside.py, test_job_faults.py).
    kill_after_register: bool = Field(default=False, description="Test hook: SIGKILL right after registration.")


def default_run_uid(run: TrainingRun) -> str:
    """metadata.uid, or a stable hash of the name (runs started from a plain YAML file have no uid)."""
    if run.metadata.uid:
        return run.metadata.uid
    return "name-" + hashlib.sha1(run.metadata.name.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunPaths:
    """Every location a run writes to (see the module docstring for the rule)."""

    run_dir: Path
    checkpoint_dir: str
    tokenizer_dir: str
    export_dir: Path

    @classmethod
    def for_run(cls, run: TrainingRun, settings: TrainerSettings) -> RunPaths:
        run_dir = settings.run_dir or settings.state_dir / "runs" / run.metadata.name
        ckpt = run.spec.checkpoint.uri or settings.checkpoint_dir or str(run_dir / "checkpoints")
        return cls(
            run_dir=Path(run_dir).absolute(),
            checkpoint_dir=_absolute(ckpt),
            tokenizer_dir=_absolute(ckpt).rstrip("/") + "/tokenizer",
            export_dir=Path(settings.export_dir or run_dir / "export").absolute(),
        )


def _absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).absolute())
