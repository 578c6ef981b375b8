"""The model card: a registered version's MLflow description, and the MLmodel file of its export.

Written at registration (the trainer) and rewritten by every evaluation that records on the version,
always from what the registry holds (the version's tags, its training run's params and metrics), so
rewriting it is idempotent and a retry never leaves two tables. The MLflow UI renders the card as
Markdown on the version page; links are the UI's own routes (`#/experiments/<id>/runs/<run>`), so they
work wherever the UI is served.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

from midfill.export import ExportMetadata
from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, TAG_RUN_UID, Registry, VersionInfo

MLMODEL_FILE = "MLmodel"
FLAVOR = "midfill"
# What the served endpoint takes and gives (the OpenAI completions fields an editor uses): the
# signature the MLflow UI shows under Schema.
SIGNATURE = {
    "inputs": [
        {"type": "string", "name": "prompt", "required": True},
        {"type": "string", "name": "suffix", "required": False},
    ],
    "outputs": [{"type": "string", "name": "text", "required": True}],
    "params": [
        {"name": "max_tokens", "type": "long", "default": 64, "shape": None},
        {"name": "temperature", "type": "double", "default": 0.0, "shape": None},
    ],
}


def write_mlmodel(export_dir: Path, meta: ExportMetadata) -> Path:
    """An MLmodel file in the export folder: flavor `midfill` (how to prompt it) and the signature."""
    import mlflow
    import yaml

    body = {
        "artifact_path": "model",
        "flavors": {
            FLAVOR: {
                "fim_format": meta.fim_format,
                "recipe": meta.recipe,
                "max_context": meta.max_context,
                "metadata_file": "midfill.json",
                "weights": "safetensors",
            }
        },
        "mlflow_version": mlflow.__version__,
        "model_uuid": uuid.uuid5(
            uuid.NAMESPACE_URL, f"midfill:{meta.training_run.uid if meta.training_run else meta.recipe}"
        ).hex,
        "utc_time_created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
        "signature": {k: json.dumps(v) for k, v in SIGNATURE.items()},
    }
    path = Path(export_dir) / MLMODEL_FILE
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _run_link(registry: Registry, run_id: str | None, label: str | None = None) -> str:
    if not run_id:
        return "-"
    try:
        exp = registry.client.get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a deleted run: name it without a link
        return f"`{run_id}`"
    return f"[{label or run_id}](#/experiments/{exp}/runs/{run_id})"


def _training(registry: Registry, run_id: str | None) -> list[str]:
    if not run_id:
        return ["No training run recorded."]
    try:
        data = registry.client.get_run(run_id).data
    except Exception:  # noqa: BLE001
        return [f"Training run `{run_id}` is not readable."]
    m, p = data.metrics, data.params
    step = int(m.get("step", 0))
    rows = [f"| steps | {step} |"]
    per_step = p.get("spec.training.globalBatchTokens")
    if per_step and per_step.isdigit() and step:
        rows.append(f"| tokens | {step * int(per_step):,} ({int(per_step):,} per step) |")
    for key, label in (
        ("loss", "final training loss"),
        ("val_loss", "final validation loss"),
        ("line_infill_exact_match", "line infill exact match"),
    ):
        if key in m:
            rows.append(f"| {label} | {m[key]:.4f} |")
    for key, label in (
        ("spec.model.recipe", "recipe"),
        ("num_params", "parameters"),
        ("train_files", "training files"),
    ):
        if key in p:
            rows.append(f"| {label} | {p[key]} |")
    return ["| | |", "|---|---|", *rows]


def _evaluations(registry: Registry, info: VersionInfo) -> list[str]:
    suites = sorted({k.split(".")[1] for k in info.tags if k.startswith("eval.") and k.count(".") >= 2})
    rows = []
    for suite in suites:
        run_link = _run_link(registry, info.tags.get(f"eval.{suite}.run_id"), "eval run")
        for key in sorted(k for k in info.tags if k.startswith(f"eval.{suite}.") and not k.endswith(".run_id")):
            metric = key.removeprefix(f"eval.{suite}.").replace("_at_", "@")
            rows.append(f"| {suite} | {metric} | {info.tags[key]} | {run_link} |")
    if not rows:
        return [f"Not evaluated yet: `midfill eval {info.uri} --suite <suite>`."]
    return ["| suite | metric | value | run |", "|---|---|---|---|", *rows]


def render(registry: Registry, info: VersionInfo) -> str:
    """The card's Markdown, from the registry's current state."""
    t = info.tags
    lineage = [
        "| | |",
        "|---|---|",
        f"| TrainingRun | `{t.get(TAG_RUN_NAME, '-')}` (uid `{t.get(TAG_RUN_UID, '-')}`, attempt "
        f"{t.get(TAG_ATTEMPT, '-')}) |",
        f"| data hash | `{t.get(TAG_DATA_HASH, '-')}` (of the files' contents) |",
        f"| training run | {_run_link(registry, info.run_id)} |",
        f"| served as | `x-midfill-model-version: {info.name}/{info.version}` |",
    ]
    return "\n".join(
        [
            f"# {info.name} version {info.version}",
            "",
            "## Lineage",
            "",
            *lineage,
            "",
            "## Training",
            "",
            *_training(registry, info.run_id),
            "",
            "## Evaluations",
            "",
            *_evaluations(registry, info),
            "",
            "_Written by midfill at registration and after each evaluation; edits here are overwritten._",
        ]
    )


def refresh(registry: Registry, name: str, version: str) -> str:
    """Rewrite the version's description from the registry's current state; returns the card."""
    info = registry.get(name, version=version)
    card = render(registry, info)
    registry.client.update_model_version(name, str(version), description=card)
    return card
