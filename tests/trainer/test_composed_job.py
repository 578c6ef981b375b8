"""Composed TrainingRuns end to end: real trainer processes, MLflow on SQLite, DCP checkpoints of the
bridge only, export -> registry -> the serving engine (trainer/composed_job.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from outside import kill_when, progress_reached, start
from safetensors.torch import load_file as load_safetensors
from test_job import _command, _ok, _trainer
from tiny_runs import tiny_run, write_run

from midfill.composition import load_composed, read_manifest
from midfill.export import read_metadata
from midfill.progress import read_progress, read_result
from midfill.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_exports import build_export

pytestmark = pytest.mark.timeout(300)


def _calm_run(name: str, *, anchor: str, augment: str, **training) -> dict:
    doc = tiny_run(name, **training)
    doc["spec"]["model"] = {"composition": {"mode": "calm", "anchor": anchor, "augment": augment, "layerSpacing": 1}}
    doc["spec"]["objective"] = {"spanCorruption": {"weight": 1.0, "maxSpans": 2}}  # infill-shaped data, CodeGen2 format
    return doc


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """A registered anchor (models:/anchor/1, 2x64) and a local augmenting export (2x32); one tokenizer."""
    root = tmp_path_factory.mktemp("parents")
    anchor = build_export(root / "anchor", hidden=64, layers=2, max_context=128, seed=0)
    augment = build_export(root / "augment", hidden=32, layers=2, max_context=128, seed=1)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    info, _ = Registry(uri).register(name="anchor", source=str(anchor), run_uid="uid-anchor")
    return root, uri, info.uri, anchor, augment


@pytest.fixture(scope="module")
def calm_run(parents):
    root, _, anchor_uri, _, augment = parents
    run_file = write_run(root / "calm.yaml", _calm_run("tiny-calm", anchor=anchor_uri, augment=str(augment)))
    _ok(_trainer(root, run_file, uid="uid-calm"))
    return root / "state" / "runs" / "tiny-calm"


def test_a_calm_run_trains_the_bridge_and_leaves_the_parents_untouched(parents, calm_run):
    root, uri, anchor_uri, anchor_dir, augment_dir = parents
    progress = read_progress(calm_run)
    assert progress.step == progress.total_steps == 30
    run = Registry(uri).client.get_run(progress.mlflow_run_id)
    assert {"loss", "val_loss", "line_infill_exact_match"} <= set(run.data.metrics)
    assert 0 < int(run.data.params["trainable_params"]) < int(run.data.params["num_params"])
    export = calm_run / "export"
    manifest = read_manifest(export)
    assert manifest["parents"]["anchor"]["ref"] == "models:/anchor/1"  # pinned, not a moving alias
    assert manifest["parents"]["augment"]["ref"] == str(augment_dir)
    bridge = load_safetensors(export / "bridge.safetensors")
    assert bridge and all(k.startswith("bridges.") for k in bridge)
    assert any(
        k.endswith("cross.o_proj.weight") and v.abs().sum() > 0 for k, v in bridge.items()
    )  # trained away from 0
    assert not (export / "model.safetensors").exists()  # the parents are referenced, never copied

    def load_parent(ref: str):
        from transformers import LlamaForCausalLM

        folder = anchor_dir if ref == "models:/anchor/1" else Path(ref)
        return LlamaForCausalLM.from_pretrained(folder)

    model = load_composed(export, load_parent=load_parent)  # fingerprints: the parents are the very weights used
    original = load_safetensors(anchor_dir / "model.safetensors")
    for name, tensor in original.items():
        assert torch.equal(model.anchor.state_dict()[name], tensor), name
    meta = read_metadata(export)
    assert meta.composition["mode"] == "calm" and meta.max_context == 128 and meta.fim_format == "codegen2"


def test_checkpoints_hold_the_bridge_and_its_optimizer_state_only(calm_run):
    ckpts = calm_run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000020", "step-00000030"]
    keys = dcp.FileSystemReader(str(ckpts / "step-00000030")).read_metadata().state_dict_metadata.keys()
    tensors = [k for k in keys if k.startswith(("model.", "optim.state."))]
    assert tensors and all(".bridges." in k for k in tensors), tensors
    assert not any(".anchor." in k or ".augment." in k for k in keys)


def test_the_registered_composition_is_served_from_the_registry(parents, calm_run, tmp_path):
    from serving.engine import Engine, SamplingParams
    from serving.loading import locate_model

    _, uri, *_ = parents
    assert read_result(calm_run).uri == "models:/tiny-calm/1"
    folder, name = locate_model("models:/tiny-calm/1", tracking_uri=uri, cache_dir=tmp_path)
    engine = Engine.from_export(folder, tracking_uri=uri, cache_dir=tmp_path)
    try:
        done = engine.infill("def add(a, b):\n", "\n\nprint(add(1, 2))\n", SamplingParams(max_tokens=8))
        assert done.finish_reason in {"stop", "length"} and done.prompt_tokens > 0
        assert 1 <= done.completion_tokens <= 8
    finally:
        engine.close()


@pytest.mark.slow
def test_a_killed_calm_run_resumes_to_the_same_bridge(parents, calm_run, tmp_path):
    """Tolerance: exact. The checkpoint at step 20 restores bridge, optimizer, scheduler, data position."""
    _, uri, anchor_uri, _, augment = parents
    run_file = write_run(tmp_path / "calm.yaml", _calm_run("tiny-calm", anchor=anchor_uri, augment=str(augment)))
    env = {"MIDFILL_TRACKING_URI": uri}
    cmd, full_env = _command(tmp_path, run_file, uid="uid-calm-b", **env)
    killed = kill_when(
        start(cmd, cwd=tmp_path, env=full_env), progress_reached(tmp_path / "state" / "runs" / "tiny-calm", 25)
    )
    assert killed.returncode == -9
    ckpt = tmp_path / "state" / "runs" / "tiny-calm" / "checkpoints"
    (ckpt / "step-00000030").mkdir()  # torn: must be skipped
    resumed = _trainer(tmp_path, run_file, uid="uid-calm-b", attempt=2, **env)
    _ok(resumed)
    assert "resumed from" in resumed.stderr and "step-00000020" in resumed.stderr
    a = load_safetensors(calm_run / "export" / "bridge.safetensors")
    b = load_safetensors(tmp_path / "state" / "runs" / "tiny-calm" / "export" / "bridge.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_codet5p_run_from_recipes_saves_its_parents_in_the_export(tmp_path):
    doc = tiny_run("tiny-codet5p", steps=4, evalIntervalSteps=100)
    doc["spec"]["model"] = {
        "composition": {"mode": "codet5p", "anchor": "debug", "augment": "debug", "encoderTrainable": True}
    }
    _ok(_trainer(tmp_path, write_run(tmp_path / "run.yaml", doc), uid="uid-c5"))
    export = tmp_path / "state" / "runs" / "tiny-codet5p" / "export"
    manifest = read_manifest(export)
    assert {r: p["ref"] for r, p in manifest["parents"].items()} == {
        "anchor": "./parents/anchor",
        "augment": "./parents/augment",
    }
    assert any(k.startswith("encoder.model.") for k in manifest["tensors"])  # the trained encoder rides in the bridge
    model = load_composed(export)  # relative parents, fingerprints of their starting weights
    assert model.mode == "codet5p" and model.encoder_trainable


def test_composed_config_errors_name_the_field(tmp_path, capsys, monkeypatch):
    from midfill.api import EXIT_CODE_INVALID_CONFIG
    from trainer.__main__ import main

    monkeypatch.setenv("MIDFILL_STATE_DIR", str(tmp_path / "state"))
    doc = _calm_run("bad-calm", anchor="debug", augment="debug")
    doc["spec"]["parallelism"] = {"strategy": "fsdp"}
    assert main(["--run", str(write_run(tmp_path / "a.yaml", doc)), "--check"]) == EXIT_CODE_INVALID_CONFIG
    assert "parallelism.strategy" in capsys.readouterr().err
    doc = _calm_run("bad-calm", anchor="debug", augment="debug")
    doc["spec"]["objective"]["documentMask"] = True
    assert main(["--run", str(write_run(tmp_path / "b.yaml", doc)), "--check"]) == EXIT_CODE_INVALID_CONFIG
    assert "objective.documentMask" in capsys.readouterr().err
