"""Tiny TrainingRun documents for the trainer tests (imported by test modules)."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_run(name: str, **training) -> dict:
    """A TrainingRun document that trains in seconds on 2 CPU cores (json + email stdlib packages)."""
    return {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "recipe": "debug",
                "architecture": {
                    "hiddenSize": 64,
                    "numLayers": 2,
                    "numHeads": 4,
                    "numKvHeads": 4,
                    "intermediateSize": 128,
                    "maxPositionEmbeddings": 128,
                },
            },
            "tokenizer": {"vocabSize": 512, "trainBytes": 1_000_000},
            "data": {
                "sources": [
                    {"uri": "stdlib://json", "include": ["*.py"]},
                    {"uri": "stdlib://email", "include": ["*.py"], "weight": 0.5},
                ],
                "validationFraction": 0.2,
            },
            "objective": {"spanCorruption": {"weight": 0.5, "maxSpans": 2}},
            "training": {
                "seqLength": 64,
                "globalBatchTokens": 1024,
                "microBatchSize": 4,
                "steps": 30,
                "learningRate": 0.003,
                "warmupSteps": 3,
                "logIntervalSteps": 5,
                "evalIntervalSteps": 15,
                "evalBatches": 2,
                **training,
            },
            "checkpoint": {"intervalSteps": 10, "keepLast": 2},
            "registry": {"tags": {"team": "test"}},
        },
    }


def write_run(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path
