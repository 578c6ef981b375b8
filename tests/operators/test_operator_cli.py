"""`midfill render` and the operator's settings/permissions."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from typer.testing import CliRunner

from midfill.cli import _load_component_commands, app
from operators.permissions import CLUSTER_RULES, NAMESPACED_RULES
from operators.settings import OperatorSettings
from tests.operators.validation import validate

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
_load_component_commands()


def test_render_training_run_prints_valid_objects():
    result = runner.invoke(
        app, ["render", "-f", str(ROOT / "manifests/samples/trainingrun-debug.yaml"), "--attempt", "2"]
    )
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert docs[2]["metadata"]["name"] == "fim-debug-a2"
    for doc in docs:
        validate(doc)


def test_render_model_release_pins_given_version():
    result = runner.invoke(app, ["render", "-f", str(ROOT / "manifests/samples/modelrelease.yaml"), "--version", "7"])
    assert result.exit_code == 0, result.output
    (rs,) = list(yaml.safe_load_all(result.stdout))
    assert "models:/fim-debug/7" in rs["spec"]["serveConfigV2"]
    without = runner.invoke(app, ["render", "-f", str(ROOT / "manifests/samples/modelrelease.yaml")])
    assert "models:/fim-debug@champion" in without.stdout and "--version" in without.stdout


def test_render_rejects_invalid_spec_naming_the_field(tmp_path):
    bad = yaml.safe_load((ROOT / "manifests/samples/trainingrun-debug.yaml").read_text())
    bad["spec"]["parallelism"]["numNodes"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = runner.invoke(app, ["render", "-f", str(path)])
    assert result.exit_code == 1 and "spec.parallelism.numNodes" in result.output


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("MIDFILL_WATCH_NAMESPACES", " team-a, team-b ,")
    monkeypatch.setenv("MIDFILL_TRACKING_URI", "http://mlflow:5000")
    s = OperatorSettings()
    assert s.namespaces() == ["team-a", "team-b"] and s.tracking_uri == "http://mlflow:5000"
    assert (s.watch_server_timeout, s.watch_client_timeout, s.peering_name, s.standalone, s.health_port) == (
        300,
        330,
        "midfill",
        False,
        8080,
    )
    monkeypatch.setenv("MIDFILL_WATCH_NAMESPACES", "")
    assert OperatorSettings().namespaces() == []


def _resources_used() -> set[tuple[str, str]]:
    """(group, plural) of every Res constant the handlers use (from operators/kube.py)."""
    tree = ast.parse((ROOT / "operators/kube.py").read_text())
    used = set()
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", "") == "Res"
        ):
            group, _, plural = (a.value for a in node.value.args)
            used.add((group, plural))
    return used


def test_rbac_covers_every_resource_the_operator_touches():
    granted = {
        (g, r) for rule in NAMESPACED_RULES + CLUSTER_RULES for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert _resources_used() <= granted
    assert ("midfill.dev", "trainingruns/status") in granted and ("", "events") in granted
    assert not any(r == "pods" for _, r in granted)  # the operator reads Job status, never pods


def test_render_7b_samples_give_every_pod_its_identity_credentials_and_mounts():
    tr = runner.invoke(app, ["render", "-f", str(ROOT / "manifests/samples/trainingrun-7b-flash.yaml")])
    mr = runner.invoke(app, ["render", "-f", str(ROOT / "manifests/samples/modelrelease-7b.yaml"), "--version", "3"])
    assert tr.exit_code == 0 and mr.exit_code == 0, tr.output + mr.output
    objects = [*yaml.safe_load_all(tr.stdout), *yaml.safe_load_all(mr.stdout)]
    job = next(o for o in objects if o["kind"] == "Job")
    cluster = next(o for o in objects if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    pods = [("trainer", job["spec"]["template"])] + [
        ("ray", g["template"]) for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    ]
    for kind, pod in pods:
        assert pod["spec"]["serviceAccountName"] == f"fim-{'trainer' if kind == 'trainer' else 'serving'}"
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            assert c["envFrom"][0]["secretRef"]["name"] == "s3-credentials", c["name"]
            assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in c["volumeMounts"]
    for obj in objects:
        validate(obj)


def test_render_never_reuses_a_uid_across_runs():
    uids = set()
    for _ in range(2):
        result = runner.invoke(app, ["render", "-f", str(ROOT / "manifests/samples/trainingrun-debug.yaml")])
        job = list(yaml.safe_load_all(result.stdout))[2]
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MIDFILL_RUN_UID"] == job["metadata"]["ownerReferences"][0]["uid"]
        assert env["MIDFILL_RUN_UID"] in result.stdout.split("\n", 1)[0]  # the header says it is a stand-in
        uids.add(env["MIDFILL_RUN_UID"])
    assert len(uids) == 2


def test_render_refuses_multi_node_without_shared_checkpoints(tmp_path):
    doc = yaml.safe_load((ROOT / "manifests/samples/trainingrun-debug.yaml").read_text())
    doc["spec"]["parallelism"]["numNodes"] = 2
    doc["spec"]["checkpoint"] = {"uri": "/data/checkpoints"}
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["render", "-f", str(path)])
    assert result.exit_code == 1
    assert "spec.parallelism.numNodes" in result.output and "spec.checkpoint.uri" in result.output
