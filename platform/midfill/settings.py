"""Settings shared by every midfill process (environment variables with the MIDFILL_ prefix).

Each component adds its own settings class next to its code (operators/settings.py,
trainer/settings.py, serving/settings.py) and may inherit these.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    """Where state and the MLflow registry live."""

    model_config = SettingsConfigDict(env_prefix="MIDFILL_", extra="ignore")

    state_dir: Path = Field(
        default=Path(".midfill"),
        description="Local state (resources, logs, checkpoints, MLflow store) for the no-cluster backend. "
        "Env MIDFILL_STATE_DIR. Default ./.midfill.",
    )
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking/registry URI (http://mlflow:5000, sqlite:///path). Env "
        "MIDFILL_TRACKING_URI. Default: SQLite in the state dir.",
    )

    def resolved_tracking_uri(self) -> str:
        """The tracking URI, defaulting to SQLite under the state dir (created on demand)."""
        if self.tracking_uri:
            return self.tracking_uri
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    def artifact_root(self) -> str:
        """Where MLflow stores artifacts for a SQLite-backed local store."""
        path = (self.state_dir / "mlartifacts").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
