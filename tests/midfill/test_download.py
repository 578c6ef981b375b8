"""One registry download for trainer, serving and composition: scratch folder, marker, rename."""

from __future__ import annotations

from pathlib import Path

import pytest

from midfill.download import COMPLETE, fetch_into, fetch_version, is_complete
from midfill.registry import Registry


def _export(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")


def test_a_download_cut_short_is_redone_not_reused(tmp_path: Path) -> None:
    dst = tmp_path / "m" / "1"

    def dies_after_the_config(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")  # what MLflow writes first
        raise ConnectionError("replica killed")

    with pytest.raises(ConnectionError):
        fetch_into(dst, dies_after_the_config, source="models:/m/1")
    assert not dst.exists()  # nothing half-written where the next call looks
    fetch_into(dst, _export, source="models:/m/1")
    assert (dst / "model.safetensors").read_bytes() == b"weights" and is_complete(dst)
    assert (dst / COMPLETE).read_text() == "models:/m/1\n"
    fetch_into(dst, lambda folder: pytest.fail("downloaded twice"), source="models:/m/1")


def test_an_unmarked_folder_from_an_older_layout_is_replaced(tmp_path: Path) -> None:
    dst = tmp_path / "m" / "1"
    dst.mkdir(parents=True)
    (dst / "done").write_text("models:/m/1")  # the old per-caller cache layout, or a torn copy
    fetch_into(dst, _export, source="models:/m/1")
    assert is_complete(dst) and not (dst / "done").exists()


def test_fetch_version_downloads_a_registered_export_once(tmp_path: Path) -> None:
    source = tmp_path / "export"
    _export(source)
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    info, _ = registry.register(name="m", source=str(source), run_uid="run-1")
    folder = fetch_version(registry, info, tmp_path / "cache" / "m" / "1")
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert folder.is_relative_to(tmp_path / "cache" / "m" / "1")
    # The source going away does not matter once the copy is complete: no second download.
    (source / "model.safetensors").unlink()
    assert fetch_version(registry, info, tmp_path / "cache" / "m" / "1") == folder
