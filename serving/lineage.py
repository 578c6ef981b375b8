"""Which model version answered, and where it came from.

Every completion names the served version: the `x-midfill-model-version: <model>/<version>` header
and OpenAI's `system_fingerprint` field (on the JSON body and on every streamed chunk). `/v1/models`
adds the version's lineage: the TrainingRun (name, uid, attempt), the data hash and the MLflow run,
read from the registry version's tags — the same values the MLflow UI shows — or, for a model served
from a local export folder, from its midfill.json (version `local`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from midfill.export import read_metadata
from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, TAG_RUN_UID, VersionInfo

VERSION_HEADER = "x-midfill-model-version"


@dataclass(frozen=True)
class Lineage:
    registered_model: str
    version: str
    training_run: str | None = None
    training_run_uid: str | None = None
    attempt: int | None = None
    data_hash: str | None = None
    mlflow_run_id: str | None = None
    source: str | None = None

    @property
    def tag(self) -> str:
        """<model>/<version>: the header value, the system_fingerprint and the metrics label."""
        return f"{self.registered_model}/{self.version}"

    def headers(self) -> dict[str, str]:
        return {VERSION_HEADER: self.tag}

    def stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        """A completion body or chunk, naming the version that produced it."""
        body["system_fingerprint"] = self.tag
        return body

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: str | int | None) -> int | None:
    return int(value) if value is not None and str(value).isdigit() else None


def from_version(info: VersionInfo) -> Lineage:
    tags = info.tags
    return Lineage(
        registered_model=info.name,
        version=info.version,
        training_run=tags.get(TAG_RUN_NAME),
        training_run_uid=tags.get(TAG_RUN_UID),
        attempt=_int(tags.get(TAG_ATTEMPT)),
        data_hash=tags.get(TAG_DATA_HASH),
        mlflow_run_id=info.run_id,
        source=info.uri,
    )


def from_folder(folder: Path, name: str) -> Lineage:
    meta = read_metadata(folder)
    run = meta.training_run
    return Lineage(
        registered_model=name,
        version="local",
        training_run=run.name if run else None,
        training_run_uid=run.uid if run else None,
        attempt=run.attempt if run else None,
        data_hash=meta.data_hash,
        mlflow_run_id=getattr(meta, "mlflow_run_id", None),
        source=str(folder),
    )
