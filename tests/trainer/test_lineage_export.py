"""A real training run (one process, CPU, real MLflow on SQLite) leaves what a reviewer needs in the
MLflow UI: the card as the version description, an MLmodel file with a signature next to the weights,
the training run's user and source, and a data hash that follows the data's content."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
from test_job import _ok, _trainer
from tiny_runs import tiny_run, write_run

from midfill.registry import TAG_DATA_HASH, Registry

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_trained_version_has_card_schema_source_and_content_hash(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(
        Path(sysconfig.get_paths()["stdlib"]) / "json", data, ignore=shutil.ignore_patterns("__pycache__", "tool.py")
    )
    doc = tiny_run("tiny-card", steps=10)
    doc["spec"]["data"] = {"sources": [{"uri": str(data), "include": ["*.py"]}], "validationFraction": 0.2}
    doc["spec"]["evaluation"] = {"suites": ["line-em"], "limit": 2, "maxNewTokens": 8}
    _ok(_trainer(tmp_path, write_run(tmp_path / "run.yaml", doc), uid="uid-card", MIDFILL_USER="reviewer-test"))
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mv = registry.client.get_model_version("tiny-card", "1")
    card = mv.description
    assert "`tiny-card` (uid `uid-card`, attempt 1)" in card and f"`{mv.tags[TAG_DATA_HASH]}`" in card
    assert "| steps | 10 |" in card and "| final training loss |" in card
    assert f"| line-em | exact_match | {mv.tags['eval.line-em.exact_match']} | [eval run]" in card

    from mlflow.models import Model

    mlmodel = registry.client.download_artifacts(mv.run_id, "model/MLmodel", str(tmp_path / "dl"))
    assert [c.name for c in Model.load(mlmodel).signature.inputs.inputs] == ["prompt", "suffix"]
    tags = registry.client.get_run(mv.run_id).data.tags
    assert tags["mlflow.user"] == "reviewer-test" and tags["mlflow.source.name"] == "midfill trainer (tiny-card-a1)"

    # One changed byte in one training file, same names and sizes: a new data hash on the next run.
    target = data / "decoder.py"
    text = target.read_text()
    target.write_text(text.replace("JSONDecodeError", "JSONDecodeErrox", 1))
    doc["metadata"]["name"] = doc["spec"]["registry"]["registeredModelName"] = "tiny-card2"
    doc["spec"].pop("evaluation")
    _ok(_trainer(tmp_path, write_run(tmp_path / "run2.yaml", doc), uid="uid-card2"))
    assert registry.get("tiny-card2", version="1").tags[TAG_DATA_HASH] != mv.tags[TAG_DATA_HASH]
