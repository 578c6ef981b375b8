"""Where a replica's model comes from: a local export folder or an MLflow registry URI."""

from __future__ import annotations

from pathlib import Path

from midfill.download import fetch_version
from midfill.export import read_metadata
from midfill.registry import Registry, VersionInfo, parse_models_uri


def locate_model(model_uri: str, *, tracking_uri: str | None, cache_dir: Path) -> tuple[Path, str]:
    """(local export folder, default served name). Registry URIs are resolved and downloaded once
    per version into cache_dir. Raises ValueError (bad URI or folder) or RegistryError."""
    folder, name, _ = locate(model_uri, tracking_uri=tracking_uri, cache_dir=cache_dir)
    return folder, name


def locate(model_uri: str, *, tracking_uri: str | None, cache_dir: Path) -> tuple[Path, str, VersionInfo | None]:
    """As locate_model, plus the registry version the URI resolved to (None for a local folder)."""
    if model_uri.startswith("models:/"):
        name, _, _ = parse_models_uri(model_uri)
        registry = Registry(tracking_uri)
        info = registry.resolve_uri(model_uri)
        folder = fetch_version(registry, info, cache_dir / info.name / info.version)
        read_metadata(folder)
        return folder, name, info
    folder = Path(model_uri).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model_uri: {model_uri} is neither models:/<name>/<version|@alias> nor an existing folder")
    read_metadata(folder)
    return folder.resolve(), folder.name, None
