"""`midfill apply/get/describe/delete/approve` on the local store: clear errors, state left intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from midfill.api import parse_resource
from midfill.local.state import StateStore

RELEASE = {
    "apiVersion": "midfill.dev/v1alpha1",
    "kind": "ModelRelease",
    "metadata": {"name": "rel"},
    "spec": {"model": {"registeredModelName": "no-such-model"}, "auth": {"apiKeySecretRef": {"name": "rel-keys"}}},
}


@pytest.fixture
def existing(state_dir: Path, tiny_run) -> dict[Path, bytes]:
    """A stored TrainingRun (not launched) whose files must survive every bad apply byte for byte."""
    store = StateStore(state_dir)
    store.apply(parse_resource(tiny_run("keep")))
    folder = state_dir / "resources"
    return {p: p.read_bytes() for p in folder.rglob("*.json")}


def _intact(state_dir: Path, existing: dict[Path, bytes]) -> None:
    now = {p: p.read_bytes() for p in (state_dir / "resources").rglob("*.json")}
    assert now == existing


def test_bad_yaml_names_the_line(cli, state_dir, existing, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: midfill.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: x\n")
    result = cli("apply", "-f", str(bad))
    assert result.exit_code == 1
    assert "invalid YAML" in result.output and "line 4" in result.output
    assert "nothing was applied" in result.output
    _intact(state_dir, existing)


def test_unknown_kind(cli, state_dir, existing, tmp_path, write_yaml) -> None:
    path = write_yaml(
        tmp_path / "k.yaml",
        {"apiVersion": "midfill.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"}, "spec": {}},
    )
    result = cli("apply", "-f", str(path))
    assert result.exit_code == 1
    assert "kind: unknown kind 'InferenceService'" in result.output
    _intact(state_dir, existing)


def test_invalid_spec_names_the_field_and_applies_nothing(
    cli, state_dir, existing, tmp_path, tiny_run, write_yaml
) -> None:
    good = tiny_run("second")
    bad = tiny_run("keep", globalBatchTokens=100)  # not a multiple of seqLength 64
    path = write_yaml(tmp_path / "two.yaml", good, bad)
    result = cli("apply", "-f", str(path))
    assert result.exit_code == 1
    assert "spec.training.globalBatchTokens" in result.output and "multiple of seqLength" in result.output
    # The valid document before the bad one is not applied either: a file applies whole or not at all.
    assert StateStore(state_dir).get("TrainingRun", "second") is None
    _intact(state_dir, existing)


def test_release_of_unknown_model_is_refused(cli, state_dir, existing, tmp_path, write_yaml) -> None:
    path = write_yaml(tmp_path / "rel.yaml", RELEASE)
    result = cli("apply", "-f", str(path))
    assert result.exit_code == 1
    assert "registered model 'no-such-model' does not exist" in result.output
    assert "spec.model.registeredModelName" in result.output
    assert StateStore(state_dir).get("ModelRelease", "rel") is None
    assert not (state_dir / "secrets").exists()  # no key minted for a release that was refused
    _intact(state_dir, existing)


def test_get_describe_and_output_formats(cli, state_dir, existing) -> None:
    table = cli("get", "tr")
    assert table.exit_code == 0
    header, row = table.output.strip().splitlines()
    assert header.split() == ["NAME", "PHASE", "NODES", "STEP", "LOSS", "MFU", "VERSION", "AGE"]
    assert row.split()[:2] == ["keep", "Pending"]
    as_json = json.loads(cli("get", "trainingruns", "keep", "-o", "json").output)
    assert as_json["kind"] == "TrainingRun" and as_json["metadata"]["uid"]
    as_yaml = yaml.safe_load(cli("get", "trainingrun", "-o", "yaml").output)
    assert as_yaml["kind"] == "List" and as_yaml["items"][0]["metadata"]["name"] == "keep"
    described = cli("describe", "tr", "keep").output
    for part in ("Name:         keep", "Recipe:", "Conditions:", "Events:", "Created"):
        assert part in described
    assert "No ModelRelease resources found" in cli("get", "mr").output


def test_clear_errors_for_names_and_kinds(cli, state_dir, existing) -> None:
    result = cli("get", "pods")
    assert result.exit_code == 1 and "unknown kind 'pods'" in result.output
    result = cli("describe", "mr", "nope")
    assert result.exit_code == 1 and "modelrelease 'nope' not found" in result.output
    result = cli("delete", "tr", "nope")
    assert result.exit_code == 1 and "not found" in result.output
    result = cli("get", "tr", "-o", "wide")
    assert result.exit_code == 1 and "-o yaml or -o json" in result.output
    result = cli("approve", "no-such-model", "--version", "1")
    assert result.exit_code == 1 and "registered model 'no-such-model' does not exist" in result.output
    _intact(state_dir, existing)


def test_delete_forgets_a_resource(cli, state_dir, existing) -> None:
    result = cli("delete", "tr", "keep")
    assert result.exit_code == 0 and "deleted" in result.output
    assert StateStore(state_dir).get("TrainingRun", "keep") is None


def test_ui_serves_the_mlflow_ui_on_the_local_store(state_dir, tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MIDFILL_STATE_DIR": str(state_dir)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "midfill"), "ui", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5", timeout=5
                )
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.5)
        assert answer.status_code == 200
        assert (state_dir / "mlflow.db").exists()  # the UI reads the store the CLI and trainer write
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_describe_shows_the_evaluation_recorded_on_the_trained_version(cli, state_dir, existing, tmp_path) -> None:
    from midfill.api.trainingrun import RegisteredModelRef
    from midfill.registry import Registry, metric_tag_key
    from midfill.settings import CoreSettings

    registry = Registry(CoreSettings().resolved_tracking_uri())
    registry.register(name="keep", source=str(tmp_path), run_uid="uid-keep")
    registry.client.set_model_version_tag("keep", "1", metric_tag_key("line-em", "exact_match"), "0.25")
    registry.client.set_model_version_tag("keep", "1", metric_tag_key("humaneval-single-line", "pass@1"), "0.125")

    def registered(rec) -> None:
        status = rec.status()
        status.registered_model = RegisteredModelRef(name="keep", version="1", uri="models:/keep/1")
        rec.set_status(status)

    StateStore(state_dir).update("TrainingRun", "keep", registered)
    described = cli("describe", "tr", "keep").output
    assert "Evaluation (models:/keep/1):" in described
    rows = [line.split() for line in described.split("Evaluation (models:/keep/1):")[1].splitlines()[1:4]]
    assert ["humaneval-single-line", "pass@1", "0.125"] in rows and ["line-em", "exact_match", "0.25"] in rows
