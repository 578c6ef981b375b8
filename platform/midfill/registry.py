"""The MLflow model registry, as midfill uses it: idempotent registration, alias resolution,
approval, and fetching a version's files.

Every midfill process talks to MLflow through this module, so idempotency (one version per
TrainingRun, whatever retries happen) is decided in one place.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

# Tags midfill puts on model versions.
TAG_RUN_NAME = "midfill.training_run"
TAG_RUN_UID = "midfill.training_run_uid"
TAG_ATTEMPT = "midfill.attempt"
TAG_DATA_HASH = "midfill.data_hash"
REVIEW_TAG = "review"
REVIEW_APPROVED = "approved"

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")
# How long a call waits for an unreachable MLflow before giving up (doubling pauses, at most 30 s
# apart). Long enough to ride out a tracking-server restart or a rolling upgrade.
DEFAULT_RETRY_SECONDS = 300.0
# For control loops (the local supervisors) that ask again on their next pass: a short wait rides out
# a locked SQLite file, while deadlines, health checks and rollbacks keep being evaluated in an outage.
LOOP_RETRY_SECONDS = 10.0
_MAX_PAUSE_S = 30.0
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
_TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR")

log = logging.getLogger("midfill.registry")
T = TypeVar("T")


class RegistryError(RuntimeError):
    """A registry lookup that cannot be satisfied (unknown model, alias or version)."""


class RegistryUnavailable(RegistryError):
    """MLflow could not be reached (or answered with a server error) for as long as the caller waits."""


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in _NOT_FOUND


def is_transient(exc: Exception) -> bool:
    """Whether trying again later can help: the server was unreachable, overloaded or failed inside.

    MLflow turns a refused connection into an MlflowException with INTERNAL_ERROR (HTTP 500) after its
    own retries; a local SQLite store raises SQLAlchemy errors (e.g. "database is locked"). Answers
    that describe the request (not found, already exists, invalid, forbidden) are final.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(exc, RegistryUnavailable):
        return True
    if isinstance(exc, RegistryError):
        return False
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or exc.get_http_status_code() >= 500
    return isinstance(exc, OSError | ConnectionError) or type(exc).__module__.startswith(("sqlalchemy", "requests"))


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version."""

    name: str
    version: str
    source: str
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        """models:/<name>/<version>"""
        return f"models:/{self.name}/{self.version}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/name/3 -> (name, "3", None); models:/name@champion -> (name, None, "champion")."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a registry URI; use models:/<name>/<version> or models:/<name>@<alias>")
    return match["name"], match["version"], match["alias"]


def _client(tracking_uri: str | None):
    # Imported lazily: mlflow takes seconds to import and most CLI commands never need it.
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _info(mv) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        source=mv.source,
        run_id=mv.run_id or None,
        tags=dict(mv.tags or {}),
        aliases=tuple(getattr(mv, "aliases", []) or []),
    )


class Registry:
    """A thin, typed wrapper over MlflowClient for the operations midfill needs."""

    def __init__(self, tracking_uri: str | None = None, *, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        """`retry_seconds`: how long each call keeps retrying an unreachable MLflow before raising
        RegistryUnavailable; 0 tries once (callers that retry on their own, like the operator's timer)."""
        self.tracking_uri = tracking_uri
        self.retry_seconds = retry_seconds
        self.client = _client(tracking_uri)

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, tried again with doubling pauses while MLflow is unavailable, each wait logged."""
        deadline = time.monotonic() + self.retry_seconds
        pause, tries = 1.0, 1
        while True:
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if time.monotonic() + pause > deadline:
                    raise RegistryUnavailable(
                        f"MLflow at {self.tracking_uri or 'the default tracking URI'} unavailable while {what} "
                        f"({tries} tries over {self.retry_seconds:g} s): {_first_line(exc)}"
                    ) from exc
                log.warning(
                    "waiting for MLflow at %s while %s (try %d failed: %s); retrying in %.0f s",
                    self.tracking_uri,
                    what,
                    tries,
                    _first_line(exc),
                    pause,
                )
                time.sleep(pause)
                pause, tries = min(pause * 2, _MAX_PAUSE_S), tries + 1

    # -- experiments ------------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created on first use. With a local store (SQLite/file),
        artifacts go next to the database instead of MLflow's default ./mlruns in the cwd."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        uri = self.tracking_uri or ""
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- registration ---------------------------------------------------------------------------
    def _versions_of_run(self, name: str, run_uid: str) -> list:
        """Every version tagged with this TrainingRun uid, oldest first (MLflow's raw objects)."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{name}' and tags.`{TAG_RUN_UID}`='{run_uid}'")
        except MlflowException as exc:
            if _is_missing(exc):
                return []
            raise  # unreachable is not "none registered": that answer would register a duplicate
        return sorted(found, key=lambda mv: int(mv.version))

    def find_by_run_uid(self, name: str, run_uid: str) -> VersionInfo | None:
        """The version a TrainingRun (by uid) already registered, if any."""
        found = self._retrying(f"looking up the version of run {run_uid}", lambda: self._versions_of_run(name, run_uid))
        return _info(found[0]) if found else None

    def register(
        self,
        *,
        name: str,
        source: str,
        run_uid: str,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        description: str | None = None,
    ) -> tuple[VersionInfo, bool]:
        """Register `source` as a version of `name`, once per TrainingRun uid.

        Returns (version, created). A retry after a crash finds the version by its run-uid tag and
        returns it instead of creating a second one. While MLflow is unreachable the calls are retried.
        A create whose answer was lost can land twice (MLflow's HTTP client retries POSTs too), so the
        uid's versions are read back every time and all but the first are deleted: calling this again
        always converges on one version.
        """
        created = self.find_by_run_uid(name, run_uid) is None
        if created:
            self._retrying(f"creating registered model {name!r}", lambda: self._ensure_model(name))
            all_tags = {**(tags or {}), TAG_RUN_UID: run_uid}

            def create() -> None:
                if not self._versions_of_run(name, run_uid):  # an earlier try may have landed
                    self.client.create_model_version(
                        name, source=source, run_id=run_id, tags=all_tags, description=description
                    )

            self._retrying(f"registering a version of {name!r} for run {run_uid}", create)
        first = self._retrying(f"checking {name!r} for duplicate versions", lambda: self._keep_first(name, run_uid))
        return first, created

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc).lower():
                raise

    def _keep_first(self, name: str, run_uid: str) -> VersionInfo:
        """The run's first version; later copies of the same registration are deleted."""
        first, *extra = self._versions_of_run(name, run_uid)
        for mv in extra:
            log.warning(
                "deleting version %s of %r: a duplicate of version %s for run %s",
                *(mv.version, name, first.version, run_uid),
            )
            self.client.delete_model_version(name, mv.version)
        return _info(first)

    # -- lookup -----------------------------------------------------------------------------------
    def get(self, name: str, *, version: str | int | None = None, alias: str | None = None) -> VersionInfo:
        """Resolve a version number or an alias: RegistryError saying what is missing, or
        RegistryUnavailable when MLflow cannot be asked."""
        assert (version is None) != (alias is None), "give exactly one of version and alias"
        what = f"version {version}" if version is not None else f"alias {alias!r}"
        return self._retrying(f"resolving {what} of {name!r}", lambda: self._get_once(name, version, alias))

    def _get_once(self, name: str, version: str | int | None, alias: str | None) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if _is_missing(exc):
                raise RegistryError(f"registered model {name!r} does not exist") from None
            raise
        try:
            mv = (
                self.client.get_model_version(name, str(version))
                if version is not None
                else self.client.get_model_version_by_alias(name, alias)
            )
        except MlflowException as exc:
            if is_transient(exc):
                raise
            what = f"version {version}" if version is not None else f"alias {alias!r}"
            raise RegistryError(f"registered model {name!r} has no {what}") from None
        return _info(mv)

    def resolve_uri(self, uri: str) -> VersionInfo:
        """Resolve models:/name/3 or models:/name@alias."""
        name, version, alias = parse_models_uri(uri)
        return self.get(name, version=version, alias=alias)

    def versions(self, name: str) -> list[VersionInfo]:
        """All versions of a model, oldest first ([] if the model does not exist)."""
        from mlflow.exceptions import MlflowException

        def search() -> list:
            try:
                return list(self.client.search_model_versions(f"name='{name}'"))
            except MlflowException as exc:
                if _is_missing(exc):
                    return []
                raise

        found = self._retrying(f"listing the versions of {name!r}", search)
        return sorted((_info(mv) for mv in found), key=lambda v: int(v.version))

    # -- review -----------------------------------------------------------------------------------
    def approve(
        self, name: str, version: str | int, *, alias: str = "champion", reviewer: str | None = None
    ) -> VersionInfo:
        """What a reviewer does in the MLflow UI: tag review=approved and point the alias at it."""
        self.get(name, version=version)

        def tag_and_alias() -> None:  # each write is idempotent, so the whole is safe to repeat
            self.client.set_model_version_tag(name, str(version), REVIEW_TAG, REVIEW_APPROVED)
            if reviewer:
                self.client.set_model_version_tag(name, str(version), "reviewer", reviewer)
            self.client.set_registered_model_alias(name, alias, str(version))

        self._retrying(f"approving version {version} of {name!r}", tag_and_alias)
        return self.get(name, version=version)

    # -- training progress (read by the operator) -----------------------------------------------------
    def _runs_of(self, run_uid: str, experiment_name: str | None, *, extra: str = "", max_results: int = 1):
        """MLflow runs tagged with a TrainingRun uid, newest first ([] when there are none yet)."""
        from mlflow.exceptions import MlflowException

        from midfill.progress import RUN_TAG_UID

        try:
            if experiment_name is not None:
                exp = self.client.get_experiment_by_name(experiment_name)
                ids = [exp.experiment_id] if exp is not None else []
            else:
                ids = [e.experiment_id for e in self.client.search_experiments()]
            if not ids:
                return []
            return self.client.search_runs(
                ids,
                filter_string=f"tags.`{RUN_TAG_UID}` = '{run_uid}'{extra}",
                order_by=["attributes.start_time DESC"],
                max_results=max_results,
            )
        except MlflowException:
            return []

    def run_progress(self, run_uid: str, *, experiment_name: str | None = None):
        """Where a TrainingRun's newest MLflow run (its latest attempt) stands, as a ProgressRecord.

        The trainer tags its run with midfill.progress.RUN_TAG_UID/RUN_TAG_ATTEMPT, logs `step`, `loss`,
        `tokens_per_second` (and `step` once when it resumes), and on each committed checkpoint the
        metric `checkpoint_step` with the tag RUN_TAG_CHECKPOINT (its URI). `update_time` is the newest
        metric's timestamp, not the run's start. None when no run is found yet.
        """
        return self._progress(self._runs_of(run_uid, experiment_name))

    def run_overview(self, run_uid: str, *, experiment_name: str | None = None):
        """(run_progress, open_attempt_runs) from one search (the operator's timer asks both)."""
        runs = self._runs_of(run_uid, experiment_name, max_results=100)
        return self._progress(runs), _open(runs)

    @staticmethod
    def _progress(runs: list):
        from midfill.progress import RUN_TAG_ATTEMPT, RUN_TAG_CHECKPOINT, ProgressRecord

        if not runs:
            return None
        run = runs[0]
        latest = {m.key: m for m in run.data.to_proto().metrics}  # the latest value of each, with its time
        attempt = run.data.tags.get(RUN_TAG_ATTEMPT)
        checkpoint = latest.get("checkpoint_step")
        checkpoint_uri = run.data.tags.get(RUN_TAG_CHECKPOINT)
        return ProgressRecord(
            step=int(latest["step"].value) if "step" in latest else 0,
            loss=latest["loss"].value if "loss" in latest else None,
            tokens_per_second=latest["tokens_per_second"].value if "tokens_per_second" in latest else None,
            tokens_per_second_per_device=latest["tokens_per_second_per_device"].value
            if "tokens_per_second_per_device" in latest
            else None,
            mfu=latest["mfu"].value if "mfu" in latest else None,
            attempt=int(attempt) if attempt and attempt.isdigit() else None,
            mlflow_run_id=run.info.run_id,
            update_time=_rfc3339(max((m.timestamp for m in latest.values()), default=0)),
            checkpoint_uri=checkpoint_uri if checkpoint is not None else None,
            checkpoint_step=int(checkpoint.value) if checkpoint is not None and checkpoint_uri else None,
            checkpoint_time=_rfc3339(checkpoint.timestamp) if checkpoint is not None else None,
        )

    def open_attempt_runs(self, run_uid: str, *, experiment_name: str | None = None) -> dict[int, str]:
        """attempt -> MLflow run id of a TrainingRun's runs that are still RUNNING."""
        return _open(
            self._runs_of(run_uid, experiment_name, extra=" and attributes.status = 'RUNNING'", max_results=100)
        )

    def end_run(self, run_id: str, status: str) -> bool:
        """End an MLflow run as `status` (FAILED, KILLED) if it is still RUNNING; whether it changed it."""
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            return False
        self.client.set_terminated(run_id, status=status)
        return True

    # -- files ------------------------------------------------------------------------------------
    def download(self, info: VersionInfo, dst: str | Path) -> Path:
        """Copy a version's files (an export folder) to dst and return the local folder."""
        import mlflow

        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        local = self._retrying(
            f"downloading {info.uri}",
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=info.source, dst_path=str(dst), tracking_uri=self.tracking_uri
            ),
        )
        return Path(local)


def _open(runs: list) -> dict[int, str]:
    """attempt -> run id of the RUNNING ones among runs (newest first: the newest run of an attempt wins)."""
    from midfill.progress import RUN_TAG_ATTEMPT

    out: dict[int, str] = {}
    for run in runs:
        attempt = run.data.tags.get(RUN_TAG_ATTEMPT, "")
        if run.info.status == "RUNNING" and attempt.isdigit():
            out.setdefault(int(attempt), run.info.run_id)
    return out


def _rfc3339(millis: int | None) -> str | None:
    import datetime as dt

    return dt.datetime.fromtimestamp(millis / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if millis else None


def metric_tag_key(suite: str, metric: str) -> str:
    """The model-version tag holding an evaluation metric (MLflow tag keys cannot hold '@')."""
    return f"eval.{suite}.{metric.replace('@', '_at_')}"


def version_metric(info: VersionInfo, key: str) -> float | None:
    """The recorded value of 'suite/metric' (e.g. humaneval-single-line/pass@1) on a version."""
    suite, _, metric = key.partition("/")
    raw = info.tags.get(metric_tag_key(suite, metric))
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


# A gate metric counts only from an evaluation of at least this many tasks (the `tasks` result every
# suite records next to its metrics): a `--limit 1` run proves nothing about a model. docs/operator.md.
MIN_GATE_TASKS = 20


def unmet_approval(
    info: VersionInfo,
    *,
    required_tags: dict[str, str],
    required_alias: str | None,
    min_metrics: dict[str, float] | None = None,
) -> list[str]:
    """What a version still lacks to be served (empty list = approved), one readable item each."""
    missing = [f"tag {k}={v}" for k, v in required_tags.items() if info.tags.get(k) != v]
    if required_alias and required_alias not in info.aliases:
        missing.append(f"alias {required_alias}")
    for key, threshold in sorted((min_metrics or {}).items()):
        value = version_metric(info, key)
        suite = key.partition("/")[0]
        tasks = version_metric(info, f"{suite}/tasks")
        if value is None:
            missing.append(
                f"metric {key} >= {threshold:g} (not evaluated: run `midfill eval {info.uri} --suite {suite}`)"
            )
        elif tasks is None or tasks < MIN_GATE_TASKS:
            missing.append(
                f"metric {key} >= {threshold:g} (evaluated on {tasks or 0:g} tasks; the gate counts runs of at "
                f"least {MIN_GATE_TASKS}: run `midfill eval {info.uri} --suite {suite}` without a small --limit)"
            )
        elif value < threshold:
            missing.append(f"metric {key} >= {threshold:g} (is {value:g})")
    return missing


def approval_reason(unmet: tuple[str, ...] | list[str]) -> str:
    """BelowMinMetrics when only evaluation thresholds hold the version back (a reviewer's tag or
    alias would not help: a better model or a new evaluation would), else WaitingForApproval."""
    return "BelowMinMetrics" if unmet and all(u.startswith("metric ") for u in unmet) else "WaitingForApproval"
