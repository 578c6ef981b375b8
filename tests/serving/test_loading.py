"""Model URIs: a local export folder, or a registry version / alias downloaded from MLflow (SQLite)."""

from __future__ import annotations

import pytest

from midfill.registry import Registry, RegistryError
from serving.loading import locate_model


def test_local_folder(tiny_export, tmp_path):
    folder, name = locate_model(str(tiny_export), tracking_uri=None, cache_dir=tmp_path)
    assert folder == tiny_export.resolve() and name == "tiny"
    with pytest.raises(ValueError, match="neither models:/"):
        locate_model(str(tmp_path / "nope"), tracking_uri=None, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a midfill export"):
        locate_model(str(tmp_path), tracking_uri=None, cache_dir=tmp_path)


def test_registry_alias_and_version_are_downloaded_once(tiny_export, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = Registry(uri)
    info, _ = registry.register(name="coder", source=str(tiny_export), run_uid="uid-1")
    registry.approve("coder", info.version)
    folder, name = locate_model("models:/coder@champion", tracking_uri=uri, cache_dir=tmp_path / "cache")
    assert name == "coder" and (folder / "midfill.json").is_file() and (folder / "model.safetensors").is_file()
    again, _ = locate_model(f"models:/coder/{info.version}", tracking_uri=uri, cache_dir=tmp_path / "cache")
    assert again == folder
    with pytest.raises(RegistryError, match="no alias"):
        locate_model("models:/coder@staging", tracking_uri=uri, cache_dir=tmp_path / "cache")
