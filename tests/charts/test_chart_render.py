"""The chart lints, renders valid Kubernetes objects for every values file, and its derived files
(chart CRDs, manifests/install.yaml) are fresh copies of their sources."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chartutil import CHART, CI_VALUES, NAMESPACE, REPO_ROOT, by_kind, container_env, one, run_helm

# The Kubernetes minors the chart supports, validated at both ends. 1.30 is the oldest minor a
# current KubeRay release supports and Chart.yaml's kubeVersion; 1.35 matches the pinned
# kubectl/helm client (v1.35). kubernetes-validate ships schemas 1.25-1.37, so both are exact.
K8S_MINORS = ("1.30", "1.35")

VALUES_CASES = [None, *CI_VALUES]
VALUES_IDS = ["defaults", *[p.name.removesuffix("-values.yaml") for p in CI_VALUES]]


def test_ci_values_files_cover_the_documented_cases() -> None:
    assert {p.name for p in CI_VALUES} >= {
        "namespaced-values.yaml",
        "external-db-values.yaml",
        "mlflow-disabled-values.yaml",
    }


@pytest.mark.parametrize("values_file", VALUES_CASES, ids=VALUES_IDS)
def test_helm_lint(helm: Path, values_file: Path | None) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    if values_file is not None:
        args += ["--values", str(values_file)]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values_file", VALUES_CASES, ids=VALUES_IDS)
def test_every_rendered_object_is_valid_kubernetes(render: Any, values_file: Path | None) -> None:
    objects = render(values_file, include_crds=True)
    assert objects
    problems = []
    for obj in objects:
        for minor in K8S_MINORS:
            try:
                kubernetes_validate.validate(obj, minor, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} on {minor}: {path}: {exc.message}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("values_file", VALUES_CASES, ids=VALUES_IDS)
def test_operator_deployment_is_locked_down(render: Any, values_file: Path | None) -> None:
    deploy = one(render(values_file), "Deployment", "midfill")
    spec = deploy["spec"]
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["command"] == ["midfill", "operator"]
    # kopf and Python need somewhere to write: /tmp is an emptyDir.
    tmp_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp_mounts and any(v["name"] == tmp_mounts[0]["name"] and "emptyDir" in v for v in pod["volumes"])
    env = container_env(container)
    port = int(env["MIDFILL_HEALTH_PORT"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert int(env["MIDFILL_WATCH_CLIENT_TIMEOUT"]) > int(env["MIDFILL_WATCH_SERVER_TIMEOUT"])
    assert env["MIDFILL_PEERING_NAME"]


def _operator_env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deploy = one(objects, "Deployment", "midfill")
    return container_env(deploy["spec"]["template"]["spec"]["containers"][0])


def _mlflow_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "Deployment", "midfill-mlflow")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "mlflow")


def test_mlflow_runs_behind_the_gate_with_three_credentials(render: Any) -> None:
    objects = render()
    pod = one(objects, "Deployment", "midfill-mlflow")["spec"]["template"]["spec"]
    gate = next(c for c in pod["containers"] if c["name"] == "gate")
    assert gate["command"] == ["midfill", "mlflow-gate"] and "--port=5000" in gate["args"]
    assert gate["ports"][0]["containerPort"] == 5000  # the Service's target: MLflow itself is not exposed
    assert {"--host=127.0.0.1", "--port=5001"} <= set(_mlflow_container(objects)["args"])
    env = container_env(gate)
    for role in ("operator", "trainer", "reviewer"):
        for key in ("username", "password"):
            ref = env[f"MIDFILL_GATE_{role.upper()}_{key.upper()}"]["secretKeyRef"]
            assert ref == {"name": f"midfill-mlflow-{role}", "key": key}
    operator = _operator_env(objects)
    assert operator["MLFLOW_TRACKING_USERNAME"] == {
        "secretKeyRef": {"name": "midfill-mlflow-operator", "key": "username"}
    }
    assert operator["MIDFILL_TRACKING_SECRET"] == "midfill-mlflow-trainer"  # trainer pods read it in their namespace
    plain = render(set_values=("mlflow.auth.enabled=false",))
    containers = one(plain, "Deployment", "midfill-mlflow")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["mlflow"] and "--host=0.0.0.0" in containers[0]["args"]
    assert "MLFLOW_TRACKING_USERNAME" not in _operator_env(plain)


def test_defaults_run_mlflow_on_sqlite_and_a_pvc(render: Any) -> None:
    objects = render()
    env = _operator_env(objects)
    assert env["MIDFILL_WATCH_NAMESPACES"] == ""
    assert env["MIDFILL_TRACKING_URI"] == f"http://midfill-mlflow.{NAMESPACE}.svc:5000"
    service = one(objects, "Service", "midfill-mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000
    pvc = one(objects, "PersistentVolumeClaim", "midfill-mlflow")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    deploy = one(objects, "Deployment", "midfill-mlflow")
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}  # SQLite + RWO volume: one writer
    container = _mlflow_container(objects)
    mlflow_env = container_env(container)
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////mlflow/mlflow.db"
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlflow/artifacts"
    assert "--serve-artifacts" in container["args"]
    assert {"name": "data", "mountPath": "/mlflow"} in container["volumeMounts"]
    volumes = deploy["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "midfill-mlflow"}} in volumes


def test_external_database_and_s3_need_no_pvc(render: Any) -> None:
    objects = render(CHART / "ci" / "external-db-values.yaml")
    assert not by_kind(objects, "PersistentVolumeClaim")
    container = _mlflow_container(objects)
    env = container_env(container)
    # The database URI carries a password: it comes from the Secret, never from a literal or argv.
    assert env["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    assert not any("postgresql" in a or "backend-store-uri" in a for a in container["args"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://team-ml/mlflow"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "mlflow-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    allowed = next(a for a in container["args"] if a.startswith("--allowed-hosts="))
    assert "mlflow.example.com" in allowed.split("=", 1)[1].split(",")
    assert not any(m["mountPath"] == "/mlflow" for m in container["volumeMounts"])


def test_sqlite_with_s3_artifacts_keeps_the_pvc_for_the_database(render: Any) -> None:
    objects = render(set_values=("mlflow.artifacts.destination=s3://bucket/mlflow",))
    assert one(objects, "PersistentVolumeClaim", "midfill-mlflow")
    env = container_env(_mlflow_container(objects))
    assert env["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////mlflow/mlflow.db"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://bucket/mlflow"


def test_existing_claim_is_used_not_created(render: Any) -> None:
    objects = render(set_values=("mlflow.persistence.existingClaim=team-mlflow",))
    assert not by_kind(objects, "PersistentVolumeClaim")
    volumes = one(objects, "Deployment", "midfill-mlflow")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "team-mlflow"}} in volumes


def test_mlflow_disabled_points_the_operator_at_the_external_server(render: Any) -> None:
    objects = render(CHART / "ci" / "mlflow-disabled-values.yaml")
    assert not [o for o in objects if o["metadata"]["name"].endswith("-mlflow")]
    assert _operator_env(objects)["MIDFILL_TRACKING_URI"] == "https://mlflow.example.com"


def test_mlflow_disabled_without_an_external_uri_is_refused(helm: Path) -> None:
    proc = run_helm(helm, "template", "midfill", str(CHART), "--set", "mlflow.enabled=false")
    assert proc.returncode != 0
    assert "externalTrackingUri" in proc.stderr


def test_namespaced_install_passes_the_namespaces_to_the_operator(render: Any) -> None:
    objects = render(CHART / "ci" / "namespaced-values.yaml")
    assert _operator_env(objects)["MIDFILL_WATCH_NAMESPACES"] == "team-a,team-b"


def test_chart_crds_equal_the_generated_crds() -> None:
    source = {p.name: p.read_text() for p in sorted((REPO_ROOT / "manifests" / "crds").glob("*.yaml"))}
    copied = {p.name: p.read_text() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert source, "manifests/crds/ is empty: run `make crds`"
    assert copied == source, "charts/midfill/crds/ is stale: run `make chart-crds manifests`"


def test_install_yaml_is_the_fresh_render_of_the_defaults(helm: Path, tmp_path: Path) -> None:
    out = tmp_path / "install.yaml"
    # The same recipe `make manifests` runs, minus its steps that write into the tree.
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-s",
            "-o",
            "tools",
            "-o",
            "chart-crds",
            "-o",
            "chart-rbac",
            "manifests",
            f"INSTALL_YAML={out}",
            f"HELM={helm}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    committed = REPO_ROOT / "manifests" / "install.yaml"
    assert committed.is_file(), "manifests/install.yaml is missing: run `make manifests`"
    assert committed.read_text() == out.read_text(), "manifests/install.yaml is stale: run `make manifests`"
    kinds = [d["kind"] for d in yaml.safe_load_all(out.read_text()) if d]
    assert kinds.count("CustomResourceDefinition") == len(list((REPO_ROOT / "manifests" / "crds").glob("*.yaml")))
