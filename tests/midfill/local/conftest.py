"""Shared fixtures of the local platform's tests: a private state dir and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from midfill.local.cli import register


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("MIDFILL_STATE_DIR", str(path))
    monkeypatch.delenv("MIDFILL_TRACKING_URI", raising=False)
    return path


@pytest.fixture
def cli(state_dir: Path):
    """Run `midfill <args>` in-process against the private state dir; returns the typer Result."""
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def _tiny_run(name: str = "tiny", *, steps: int = 4, **training) -> dict:
    """A TrainingRun document sized for tests (a few stdlib files, tiny vocab, short sequences)."""
    return {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "recipe": "debug",
                "architecture": {
                    "hiddenSize": 32,
                    "numLayers": 1,
                    "numHeads": 2,
                    "numKvHeads": 2,
                    "intermediateSize": 64,
                    "maxPositionEmbeddings": 64,
                },
            },
            "tokenizer": {"vocabSize": 512, "trainBytes": 1_000_000},
            "data": {
                "sources": [{"uri": "stdlib://", "include": ["json/*.py", "textwrap.py", "string.py", "bisect.py"]}],
                "validationFraction": 0.2,
            },
            "training": {
                "seqLength": 64,
                "globalBatchTokens": 256,
                "microBatchSize": 4,
                "steps": steps,
                "warmupSteps": 1,
                "logIntervalSteps": 1,
                "evalIntervalSteps": 1000,
                "evalBatches": 1,
                **training,
            },
            "checkpoint": {"intervalSteps": 2, "keepLast": 2},
            "registry": {"registeredModelName": name},
        },
    }


def _write_yaml(path: Path, *docs: dict) -> Path:
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    return path


@pytest.fixture
def tiny_run():
    """tiny_run(name, steps=..., **training) -> a TrainingRun document sized for tests."""
    return _tiny_run


@pytest.fixture
def write_yaml():
    """write_yaml(path, *docs) -> path of a YAML stream of the documents."""
    return _write_yaml
