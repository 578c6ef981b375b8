"""What a training job tells the world as it goes: metrics to MLflow, progress.json beside the run
(which the operator and the local backend read) and a log line per interval."""

from __future__ import annotations

import logging
from pathlib import Path

from midfill.api import now_rfc3339
from midfill.progress import PROGRESS_FILE, RUN_TAG_CHECKPOINT, ProgressRecord, write_json_atomic
from trainer.tracking import Tracker

log = logging.getLogger(__name__)


class Reporter:
    """Keeps the run's ProgressRecord and writes it (rank 0 only) on every log and checkpoint."""

    def __init__(self, tracker: Tracker, progress: ProgressRecord, *, run_dir: Path, is_main: bool) -> None:
        self.tracker = tracker
        self.progress = progress
        self.run_dir = run_dir
        self.is_main = is_main

    def write_progress(self, **update) -> None:
        self.progress = self.progress.model_copy(update={**update, "update_time": now_rfc3339()})
        if self.is_main:
            write_json_atomic(self.run_dir / PROGRESS_FILE, self.progress)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """The loop's log interval: metrics to MLflow, progress.json, one log line."""
        self.tracker.log_metrics(metrics, step=step)
        self.write_progress(
            step=step,
            loss=metrics["loss"],
            tokens_per_second=metrics.get("tokens_per_second"),
            tokens_per_second_per_device=metrics.get("tokens_per_second_per_device"),
            mfu=metrics.get("mfu"),
        )
        mfu = f"{metrics['mfu']:.1%}" if "mfu" in metrics else "n/a (peak unknown: training.peakTflops)"
        log.info(
            "step %d/%d loss %.4f lr %.2e tok/s %.0f (%.0f per device) MFU %s",
            step,
            self.progress.total_steps,
            metrics["loss"],
            metrics["lr"],
            metrics.get("tokens_per_second", float("nan")),
            metrics.get("tokens_per_second_per_device", float("nan")),
            mfu,
        )

    def checkpoint(self, step: int, uri: str, *, current_step: int) -> None:
        """Where the newest committed checkpoint is: progress.json and the MLflow run (the operator
        reads it). `current_step` is the loop's step now (a resume reports before it moves)."""
        self.tracker.set_tags({RUN_TAG_CHECKPOINT: uri})
        self.tracker.log_metrics({"checkpoint_step": step, "step": current_step}, step=current_step)
        self.write_progress(step=current_step, checkpoint_uri=uri, checkpoint_step=step, checkpoint_time=now_rfc3339())
