"""MLflow tracking from rank 0: one MLflow run per TrainingRun attempt, reused on a retry.

The run is found by its tags (`midfill.training_run_uid`, `midfill.attempt`), so a process that
restarts inside the same attempt appends to the same run instead of starting a new one; the
operator finds the run by the same tags.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from midfill.progress import RUN_TAG_ATTEMPT, RUN_TAG_UID

log = logging.getLogger(__name__)


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """{'training': {'seqLength': 512}} -> {'training.seqLength': '512'} (MLflow params are flat)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = str(obj)[:6000]
    return out


def source_tags(run_name: str) -> dict[str, str]:
    """What the MLflow UI shows as a run's "Created by" and "Source" (a client-created run has neither)."""
    import getpass

    try:
        user = os.environ.get("MIDFILL_USER") or getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = "unknown"
    return {"mlflow.user": user, "mlflow.source.name": f"midfill trainer ({run_name})", "mlflow.source.type": "JOB"}


class Tracker:
    """Logging to one MLflow run; every method is a no-op on ranks other than 0."""

    def __init__(self, *, enabled: bool, tracking_uri: str, experiment: str, artifact_root: str | None) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.artifact_uri: str | None = None
        if not enabled:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.experiment_id = self._experiment(experiment, artifact_root)

    def _experiment(self, name: str, artifact_root: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException:  # created by another process in the meantime
            found = self.client.get_experiment_by_name(name)
            assert found is not None
            return found.experiment_id

    def start(self, *, run_name: str, uid: str, attempt: int, tags: dict[str, str]) -> str | None:
        """Find this attempt's run or create it; returns the MLflow run id."""
        if not self.enabled:
            return None
        query = f"tags.`{RUN_TAG_UID}` = '{uid}' and tags.`{RUN_TAG_ATTEMPT}` = '{attempt}'"
        found = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if found:
            run = found[0]
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            log.info("reusing MLflow run %s", run.info.run_id)
        else:
            all_tags = {**source_tags(run_name), **tags, RUN_TAG_UID: uid, RUN_TAG_ATTEMPT: str(attempt)}
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
        return self.run_id

    def _active_run(self) -> str:
        assert self.run_id is not None, "Tracker.start() comes before any logging"
        return self.run_id

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            try:
                self.client.log_batch(self._active_run(), params=items[i : i + 100])
            except MlflowException as exc:  # a reused run keeps its first values
                log.warning("could not log params: %s", str(exc).splitlines()[0])

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        if not self.enabled or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self._active_run(), metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self._active_run(), tags=[RunTag(k, v) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> str | None:
        """Upload a folder; returns its artifact URI (the registered version's source)."""
        if not self.enabled:
            return None
        self.client.log_artifacts(self._active_run(), local_dir, artifact_path)
        return f"{self.artifact_uri}/{artifact_path}"

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
