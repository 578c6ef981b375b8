"""midfill.registry against a real MLflow on SQLite: idempotent registration, resolution, approval."""

from __future__ import annotations

from pathlib import Path

import pytest

from midfill.registry import Registry, RegistryError, parse_models_uri, unmet_approval


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("mlflow")
    return Registry(f"sqlite:///{root / 'mlflow.db'}")


def test_register_is_idempotent_per_training_run(registry: Registry, tmp_path: Path) -> None:
    first, created = registry.register(name="m", source=str(tmp_path), run_uid="uid-1", tags={"midfill.attempt": "1"})
    assert created and first.version == "1"
    again, created_again = registry.register(
        name="m", source=str(tmp_path), run_uid="uid-1", tags={"midfill.attempt": "2"}
    )
    assert not created_again and again.version == first.version  # a retry finds, never duplicates
    other, created_other = registry.register(name="m", source=str(tmp_path), run_uid="uid-2")
    assert created_other and other.version == "2"
    assert [v.version for v in registry.versions("m")] == ["1", "2"]


def test_resolve_alias_version_and_approval(registry: Registry, tmp_path: Path) -> None:
    info, _ = registry.register(name="a", source=str(tmp_path), run_uid="uid-a")
    assert unmet_approval(info, required_tags={"review": "approved"}, required_alias="champion") == [
        "tag review=approved",
        "alias champion",
    ]
    with pytest.raises(RegistryError, match="no alias 'champion'"):
        registry.resolve_uri("models:/a@champion")
    approved = registry.approve("a", info.version, alias="champion", reviewer="ana")
    assert unmet_approval(approved, required_tags={"review": "approved"}, required_alias="champion") == []
    assert registry.resolve_uri("models:/a@champion").version == info.version
    assert registry.resolve_uri(f"models:/a/{info.version}").uri == f"models:/a/{info.version}"


def test_missing_model_and_version_are_clear(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="'nope' does not exist"):
        registry.get("nope", alias="champion")
    registry.register(name="b", source="/tmp", run_uid="uid-b")
    with pytest.raises(RegistryError, match="no version 9"):
        registry.get("b", version=9)
    assert registry.versions("nope") == []


def test_parse_models_uri() -> None:
    assert parse_models_uri("models:/fim/3") == ("fim", "3", None)
    assert parse_models_uri("models:/fim@champion") == ("fim", None, "champion")
    with pytest.raises(ValueError, match="models:/<name>/<version>"):
        parse_models_uri("runs:/abc/model")
