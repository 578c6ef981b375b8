"""ModelRelease handlers end to end: registry approval in MLflow (SQLite) -> RayService in the emulator.

The test plays KubeRay's part by writing the RayService status it would report.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from midfill.api import parse_resource
from midfill.registry import MIN_GATE_TASKS, Registry, metric_tag_key
from operators.modelrelease.handlers import resolve
from tests.operators.emulator import eventually

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "modelrelease.yaml"


def release() -> dict:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"] = {"name": "fim"}
    return doc


def served_uri(rayservice: dict) -> str:
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config["applications"][0]["args"]["model_uri"]


def status(cluster) -> dict:
    return (cluster.get("modelreleases", "fim") or {}).get("status") or {}


async def kuberay_reports_running(cluster, endpoint=None) -> None:
    """KubeRay reports the app RUNNING; with `endpoint`, the replicas also answer /health with the
    version the RayService names (loaded and warmed up)."""
    rs = cluster.get("rayservices", "fim")
    if endpoint is not None:
        version = rs["metadata"]["annotations"]["midfill.dev/model-version"]
        endpoint.serve(rs["metadata"]["namespace"], "fim-serve-svc", "fim-debug", version)
    await cluster.patch(
        "rayservices",
        "fim",
        {
            "status": {
                "observedGeneration": rs["metadata"]["generation"],
                "activeServiceStatus": {"applicationStatuses": {"infill": {"status": "RUNNING"}}},
            }
        },
        "status",
    )


async def test_unapproved_then_approved_versions_roll_in_place(
    cluster, operator, tracking_uri, tmp_path, serve_endpoint
):
    registry = Registry(tracking_uri)
    registry.register(name="fim-debug", source=str(tmp_path), run_uid="run-1")
    registry.client.set_registered_model_alias("fim-debug", "champion", "1")  # alias set, review tag missing

    async with operator():
        await cluster.create(release())
        await eventually(lambda: status(cluster).get("phase") == "WaitingForApproval", what="WaitingForApproval")
        assert "tag review=approved" in status(cluster)["message"]
        assert cluster.get("rayservices", "fim") is None

        registry.approve("fim-debug", 1)
        rs = await eventually(lambda: cluster.get("rayservices", "fim"), what="RayService")
        assert served_uri(rs) == "models:/fim-debug/1"
        first_cluster_config, first_uid = rs["spec"]["rayClusterConfig"], rs["metadata"]["uid"]
        # KubeRay says RUNNING, but no replica answers /health with version 1 yet: not Available.
        await kuberay_reports_running(cluster)
        hits = serve_endpoint.hits
        await eventually(lambda: serve_endpoint.hits >= hits + 2, what="the operator reading /health")
        assert status(cluster).get("phase") == "Progressing" and "stableVersion" not in status(cluster)
        assert "endpoint /health unreachable" in status(cluster)["message"]
        await kuberay_reports_running(cluster, serve_endpoint)
        await eventually(lambda: status(cluster).get("phase") == "Available", what="Available")
        assert status(cluster)["stableVersion"] == "1"
        assert status(cluster)["url"].startswith("http://fim-serve-svc.team.svc")

    # Restarted operator: finds the RayService and leaves it alone.
    async with operator():
        registry.register(name="fim-debug", source=str(tmp_path), run_uid="run-2")
        registry.approve("fim-debug", 2)
        rs = await eventually(
            lambda: (r := cluster.get("rayservices", "fim")) and served_uri(r) == "models:/fim-debug/2" and r,
            what="serveConfigV2 on version 2",
        )
        # In place: same object, same cluster config; only serveConfigV2 (and our annotations) changed.
        assert rs["metadata"]["uid"] == first_uid and rs["spec"]["rayClusterConfig"] == first_cluster_config
        assert [v["metadata"]["uid"] for v in cluster.history("rayservices", "fim")].count(first_uid) == len(
            cluster.history("rayservices", "fim")
        )
        assert cluster.names("rayservices") == ["fim"]
        await kuberay_reports_running(cluster, serve_endpoint)
        await eventually(
            lambda: status(cluster).get("stableVersion") == "2" and status(cluster)["phase"] == "Available"
        )
        assert status(cluster)["previousStableVersion"] == "1"

        await cluster.delete("modelreleases", "fim")
        await eventually(lambda: not cluster.names("rayservices"), what="RayService deleted")


async def test_unhealthy_version_is_rolled_back(cluster, operator, tracking_uri, tmp_path, serve_endpoint):
    registry = Registry(tracking_uri)
    for uid in ("a", "b"):
        registry.register(name="fim-debug", source=str(tmp_path), run_uid=uid)
    registry.approve("fim-debug", 1)
    doc = release()
    doc["spec"]["rollout"]["healthDeadlineSeconds"] = 10
    async with operator():
        await cluster.create(doc)
        await eventually(lambda: cluster.get("rayservices", "fim"), what="RayService")
        await kuberay_reports_running(cluster, serve_endpoint)
        await eventually(lambda: status(cluster).get("stableVersion") == "1")
        registry.approve("fim-debug", 2)
        await eventually(lambda: served_uri(cluster.get("rayservices", "fim")) == "models:/fim-debug/2")
        # KubeRay reports RUNNING for the new spec, but the replicas never report version 2 (the old
        # ones keep answering with 1): after the deadline the operator goes back to 1.
        await kuberay_reports_running(cluster)
        await eventually(
            lambda: served_uri(cluster.get("rayservices", "fim")) == "models:/fim-debug/1",
            timeout=40,
            what="rollback to version 1",
        )
        # The RayService is patched before the status is written: wait for the condition too.
        rolled = await eventually(
            lambda: next((c for c in status(cluster).get("conditions", []) if c["type"] == "RolledBack"), None),
            what="RolledBack condition",
        )
        assert rolled["status"] == "True" and "version 2" in rolled["message"]
        assert status(cluster)["resolvedVersion"] == "2" and status(cluster)["stableVersion"] == "1"


def test_resolve_applies_min_metrics_from_the_version_tags(tmp_path):
    """The operator's registry read: an approved version below spec.approval.minMetrics stays unmet."""
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    registry.register(name="fim-debug", source=str(tmp_path), run_uid="run-1")
    registry.approve("fim-debug", 1)
    doc = release()
    doc["spec"]["approval"] = {"minMetrics": {"line-em/exact_match": 0.25}}
    rel = parse_resource(doc)
    assert resolve(registry, rel).unmet == (
        "metric line-em/exact_match >= 0.25 (not evaluated: run `midfill eval models:/fim-debug/1 --suite line-em`)",
    )
    key = metric_tag_key("line-em", "exact_match")
    registry.client.set_model_version_tag("fim-debug", "1", key, "0.5")
    registry.client.set_model_version_tag("fim-debug", "1", metric_tag_key("line-em", "tasks"), "1")
    (few,) = resolve(registry, rel).unmet  # a `--limit 1` result does not count
    assert f"evaluated on 1 tasks; the gate counts runs of at least {MIN_GATE_TASKS}" in few
    registry.client.set_model_version_tag("fim-debug", "1", metric_tag_key("line-em", "tasks"), str(MIN_GATE_TASKS))
    registry.client.set_model_version_tag("fim-debug", "1", key, "0.125")
    assert resolve(registry, rel).unmet == ("metric line-em/exact_match >= 0.25 (is 0.125)",)
    registry.client.set_model_version_tag("fim-debug", "1", key, "0.5")
    assert resolve(registry, rel).unmet == ()


async def test_a_rayservice_whose_release_is_gone_is_deleted(cluster, operator):
    # As left behind when the operator was down (or missed the DELETED event) while its ModelRelease
    # was deleted, on a cluster without the garbage collector acting on the ownerReference.
    from operators.modelrelease import builders

    await cluster.create(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": {
                "name": "fim",
                "labels": {builders.LABEL_RELEASE: "fim", **builders.MANAGED_BY},
                "ownerReferences": [
                    {
                        "apiVersion": "midfill.dev/v1alpha1",
                        "kind": "ModelRelease",
                        "name": "fim",
                        "uid": "gone",
                        "controller": True,
                    }
                ],
            },
            "spec": {"serveConfigV2": ""},
        }
    )
    await cluster.create(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",  # not ours: left alone
            "metadata": {"name": "other", "labels": {builders.LABEL_RELEASE: "other"}},
            "spec": {},
        }
    )
    async with operator():
        await eventually(lambda: cluster.names("rayservices") == ["other"], what="orphaned RayService deleted")


async def test_pod_template_reaches_the_ray_head_and_workers(cluster, operator, tracking_uri, tmp_path):
    registry = Registry(tracking_uri)
    registry.register(name="fim-debug", source=str(tmp_path), run_uid="run-1")
    registry.approve("fim-debug", 1)
    doc = release()
    doc["spec"]["endpoint"]["podTemplate"] = {
        "serviceAccountName": "fim-serving",
        "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
        "imagePullSecrets": [{"name": "registry"}],
        "annotations": {"a": "b"},
    }
    async with operator():
        await cluster.create(doc)
        rs = await eventually(lambda: cluster.get("rayservices", "fim"), what="RayService")
    groups = [rs["spec"]["rayClusterConfig"]["headGroupSpec"], *rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]
        assert pod["spec"]["serviceAccountName"] == "fim-serving" and pod["metadata"]["annotations"] == {"a": "b"}
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
        assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]


def _rolling(condition: dict) -> bool:
    return (condition["type"], condition["status"]) == ("Progressing", "True")


def events_of(cluster, name: str) -> list[dict]:
    return [
        obj.raw
        for (res, _ns, _name), obj in cluster.emulator.objects.items()
        if res.plural == "events" and not obj.deleted and obj.raw.get("involvedObject", {}).get("name") == name
    ]


async def test_a_version_that_fails_to_load_is_rolled_back_at_once(
    cluster, operator, tracking_uri, tmp_path, serve_endpoint
):
    """DEPLOY_FAILED (Serve gave up: the constructor could not load the weights) is not waited out
    for healthDeadlineSeconds: Degraded with an Event naming why, then back on the stable version."""
    registry = Registry(tracking_uri)
    for uid in ("a", "b"):
        registry.register(name="fim-debug", source=str(tmp_path), run_uid=uid)
    registry.approve("fim-debug", 1)
    doc = release()
    doc["spec"]["rollout"]["healthDeadlineSeconds"] = 3600
    async with operator():
        await cluster.create(doc)
        await eventually(lambda: cluster.get("rayservices", "fim"), what="RayService")
        await kuberay_reports_running(cluster, serve_endpoint)
        await eventually(
            lambda: status(cluster).get("stableVersion") == "1" and status(cluster)["phase"] == "Available"
        )
        served_generation = status(cluster)["observedGeneration"]
        registry.approve("fim-debug", 2)
        await eventually(lambda: served_uri(cluster.get("rayservices", "fim")) == "models:/fim-debug/2")
        rs = cluster.get("rayservices", "fim")
        await cluster.patch(
            "rayservices",
            "fim",
            {
                "status": {
                    "observedGeneration": rs["metadata"]["generation"],
                    "activeServiceStatus": {
                        "applicationStatuses": {
                            "infill": {
                                "status": "DEPLOY_FAILED",
                                "message": "replica constructor failed: SafetensorError: invalid header",
                            }
                        }
                    },
                }
            },
            "status",
        )
        await eventually(
            lambda: served_uri(cluster.get("rayservices", "fim")) == "models:/fim-debug/1",
            timeout=20,
            what="rollback to version 1 long before the health deadline",
        )
        degraded = await eventually(
            lambda: next((e for e in events_of(cluster, "fim") if e.get("reason") == "Degraded"), None),
            what="a Degraded event",
        )
        assert degraded["type"] == "Warning" and "version 2 failed to load" in degraded["message"]
        assert "SafetensorError" in degraded["message"] and "rolling back to version 1" in degraded["message"]
        await kuberay_reports_running(cluster, serve_endpoint)
        await eventually(lambda: status(cluster).get("phase") == "Available", what="Available on version 1")
        conditions = {c["type"]: c for c in status(cluster)["conditions"]}
        assert (conditions["RolledBack"]["status"], conditions["RolledBack"]["reason"]) == ("True", "LoadFailed")
        assert status(cluster)["stableVersion"] == "1" and status(cluster)["resolvedVersion"] == "2"
        assert status(cluster)["observedGeneration"] == served_generation  # no spec edit: same generation


async def test_a_spec_edit_is_observed_once_the_endpoint_serves_it(
    cluster, operator, tracking_uri, tmp_path, serve_endpoint
):
    """observedGeneration stays on the old generation while the edit rolls out (Progressing says
    what), and moves once KubeRay reports the rebuilt RayService running and the replicas answer."""
    registry = Registry(tracking_uri)
    registry.register(name="fim-debug", source=str(tmp_path), run_uid="a")
    registry.approve("fim-debug", 1)
    async with operator():
        await cluster.create(release())
        await eventually(lambda: cluster.get("rayservices", "fim"), what="RayService")
        await kuberay_reports_running(cluster, serve_endpoint)
        await eventually(lambda: status(cluster).get("phase") == "Available")
        generation = cluster.get("modelreleases", "fim")["metadata"]["generation"]
        assert status(cluster)["observedGeneration"] == generation
        serve_endpoint.down("team", "fim-serve-svc")  # the edit replaces the replicas: none ready for now
        await cluster.patch("modelreleases", "fim", {"spec": {"endpoint": {"routePrefix": "/fim"}}})
        await eventually(
            lambda: (
                cluster.get("rayservices", "fim")["metadata"]["annotations"].get("midfill.dev/release-generation")
                == str(generation + 1)
            ),
            what="the RayService rebuilt from the edited spec",
        )
        progressing = await eventually(
            lambda: next((c for c in status(cluster).get("conditions", []) if _rolling(c)), None),
            what="Progressing",
        )
        assert progressing["reason"] == "SpecChanged"
        hits = serve_endpoint.hits
        await eventually(lambda: serve_endpoint.hits >= hits + 2, what="the operator reading /health")
        assert status(cluster)["observedGeneration"] == generation  # not applied yet
        await kuberay_reports_running(cluster, serve_endpoint)
        await eventually(
            lambda: (
                status(cluster).get("observedGeneration") == generation + 1 and status(cluster)["phase"] == "Available"
            ),
            what="the edit observed",
        )
        assert status(cluster)["url"].endswith(":8000/fim")
