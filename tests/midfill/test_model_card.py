"""The model card on a registered version (real MLflow on SQLite): lineage, training summary, and an
evaluation table that links each eval run; eval runs link back; the MLmodel file carries a signature."""

from __future__ import annotations

from pathlib import Path

from midfill import model_card
from midfill.evaluation.runner import SuiteResult, record_on_version
from midfill.export import ExportMetadata
from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, Registry


def _version(tmp_path: Path):
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = registry.experiment_id("train")
    run = registry.client.create_run(exp, run_name="tiny-a1")
    for step, loss in ((10, 4.5), (30, 2.25)):
        registry.client.log_metric(run.info.run_id, "loss", loss, step=step)
        registry.client.log_metric(run.info.run_id, "step", step, step=step)
    registry.client.log_metric(run.info.run_id, "val_loss", 2.5, step=30)
    registry.client.log_param(run.info.run_id, "spec.training.globalBatchTokens", "1024")
    info, _ = registry.register(
        name="fim",
        source=str(tmp_path),
        run_uid="uid-7",
        run_id=run.info.run_id,
        tags={TAG_RUN_NAME: "tiny", TAG_ATTEMPT: "2", TAG_DATA_HASH: "0123abcd0123abcd"},
    )
    return registry, info, exp


def test_card_names_the_lineage_and_the_training(tmp_path):
    registry, info, exp = _version(tmp_path)
    card = model_card.refresh(registry, "fim", info.version)
    assert (
        registry.get("fim", version=info.version)
        and registry.client.get_model_version("fim", info.version).description == card
    )
    assert "`tiny` (uid `uid-7`, attempt 2)" in card and "`0123abcd0123abcd`" in card
    assert f"(#/experiments/{exp}/runs/{info.run_id})" in card
    assert "| steps | 30 |" in card and "| tokens | 30,720 (1,024 per step) |" in card
    assert "| final training loss | 2.2500 |" in card and "| final validation loss | 2.5000 |" in card
    assert "Not evaluated yet" in card


def test_each_evaluation_rewrites_the_table_and_links_both_ways(tmp_path):
    registry, info, _ = _version(tmp_path)
    model_card.refresh(registry, "fim", info.version)
    first = record_on_version(
        SuiteResult("line-em", "fim", {"exact_match": 0.25}),
        tracking_uri=registry.tracking_uri,
        name="fim",
        version=info.version,
    )
    second = record_on_version(
        SuiteResult("humaneval-single-line", "fim", {"pass@1": 0.5}),
        tracking_uri=registry.tracking_uri,
        name="fim",
        version=info.version,
    )
    card = registry.client.get_model_version("fim", info.version).description
    eval_exp = registry.client.get_run(first).info.experiment_id
    assert f"| line-em | exact_match | 0.25 | [eval run](#/experiments/{eval_exp}/runs/{first}) |" in card
    assert f"| humaneval-single-line | pass@1 | 0.5 | [eval run](#/experiments/{eval_exp}/runs/{second}) |" in card
    assert card.count("| line-em |") == 1 and "Not evaluated yet" not in card
    note = registry.client.get_run(second).data.tags["mlflow.note.content"]
    assert f"(#/models/fim/versions/{info.version})" in note


def test_mlmodel_file_has_a_flavor_and_a_signature(tmp_path):
    from mlflow.models import Model

    meta = ExportMetadata(fim_format="codegen2", max_context=128, recipe="debug")
    model_card.write_mlmodel(tmp_path, meta)
    loaded = Model.load(str(tmp_path / "MLmodel"))
    assert loaded.flavors["midfill"]["fim_format"] == "codegen2"
    assert [c.name for c in loaded.signature.inputs.inputs] == ["prompt", "suffix"]
    assert [c.name for c in loaded.signature.outputs.inputs] == ["text"]
    assert [p.name for p in loaded.signature.params.params] == ["max_tokens", "temperature"]
