"""ModelRelease builders: serveConfigV2 carries the serving app and its args, the version changes only it."""

from __future__ import annotations

from pathlib import Path

import yaml

from midfill.api import load_file
from midfill.serve_args import KEY_SETTINGS, RELOADABLE, ROUTER_SETTINGS, ServeArgs
from operators.modelrelease import builders
from operators.settings import OperatorSettings
from tests.operators.validation import validate

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "modelrelease.yaml"
SETTINGS = OperatorSettings(tracking_uri="http://mlflow:5000")


def release():
    (rel,) = load_file(SAMPLE)
    rel.metadata.namespace, rel.metadata.uid = "team", "r-uid"
    rel.spec.endpoint.node_pool.node_selector = {"pool": "gpu"}
    return rel


def test_serve_config_runs_the_app_with_release_args():
    rel = release()
    rs = builders.build_rayservice(rel, version="3", settings=SETTINGS)
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:build_app" and app["route_prefix"] == "/"
    expected = ServeArgs.for_release(
        rel,
        model_uri="models:/fim-debug/3",
        tracking_uri="http://mlflow:5000",
        api_keys_file="/etc/midfill/api-keys/api-keys",
    ).model_dump(mode="json")
    assert app["args"] == {
        k: v
        for k, v in expected.items()
        if (k not in RELOADABLE or k in (*KEY_SETTINGS, "max_queued_requests")) and k not in ROUTER_SETTINGS
    }
    (deployment,) = app["deployments"]
    assert deployment["name"] == "InfillServer"
    assert deployment["user_config"] == {k: expected[k] for k in RELOADABLE}
    assert app["args"]["max_replicas"] == 4 and app["args"]["num_cpus"] == 2.0
    assert rs["metadata"]["annotations"]["midfill.dev/model-version"] == "3"
    assert rs["metadata"]["ownerReferences"][0]["uid"] == "r-uid"


def test_cluster_config_has_image_resources_node_pool_and_secret():
    rs = builders.build_rayservice(release(), version="3", settings=SETTINGS)
    cluster = rs["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["image"] == "ghcr.io/midfill/serving:0.1.0"
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}}
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert workers["minReplicas"] == 1 and workers["maxReplicas"] == 4 and cluster["enableInTreeAutoscaling"] is True
    assert pod["volumes"] == [{"name": "api-keys", "secret": {"secretName": "fim-debug-api-keys"}}]
    assert {"name": "api-keys", "mountPath": "/etc/midfill/api-keys", "readOnly": True} in pod["containers"][0][
        "volumeMounts"
    ]


def test_a_new_version_changes_only_serve_config():
    rel = release()
    v3 = builders.build_rayservice(rel, version="3", settings=SETTINGS)
    v4 = builders.build_rayservice(rel, version="4", settings=SETTINGS)
    assert v3["spec"]["rayClusterConfig"] == v4["spec"]["rayClusterConfig"]
    assert v3["spec"]["serveConfigV2"] != v4["spec"]["serveConfigV2"]
    patch = builders.version_patch(rel, version="4", settings=SETTINGS, rollout_start="2026-01-01T00:00:00Z")
    assert set(patch["spec"]) == {"serveConfigV2"} and patch["spec"]["serveConfigV2"] == v4["spec"]["serveConfigV2"]
    # A spec edit (the release's generation moved) carries the cluster config along.
    edited = builders.version_patch(
        rel, version="4", settings=SETTINGS, rollout_start="2026-01-01T00:00:00Z", spec_changed=True
    )
    assert edited["spec"]["rayClusterConfig"] == v4["spec"]["rayClusterConfig"]


def test_auth_disabled_mounts_nothing_and_objects_validate():
    rel = release()
    rel.spec.auth.api_key_secret_ref = None
    rel.spec.auth.disabled = True
    rs = builders.build_rayservice(rel, version="1", settings=SETTINGS)
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["auth_disabled"] is True and args["api_keys_file"] is None
    assert "volumes" not in rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    validate(rs)
    validate(builders.build_rayservice(release(), version="2", settings=SETTINGS))


def test_pod_template_reaches_the_ray_head_and_worker_pods():
    (rel,) = load_file(SAMPLE.parent / "modelrelease-7b.yaml")
    rel.metadata.namespace, rel.metadata.uid = "team", "u1"
    rs = builders.build_rayservice(rel, version="3", settings=OperatorSettings(tracking_uri="http://mlflow:5000"))
    cluster = rs["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]
        assert pod["spec"]["serviceAccountName"] == "fim-serving"
        assert pod["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 100}
        assert pod["metadata"]["labels"]["team"] == "code-assist"
        assert pod["metadata"]["labels"][builders.LABEL_RELEASE] == "fim-7b"
        (c,) = pod["spec"]["containers"]
        assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials", "optional": True}}]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert set(env) == {"MIDFILL_TRACKING_URI", "AWS_REGION", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"}
        # Every node's Serve proxy answers a lost replica with a retryable 503 (serving.proxy).
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serving.proxy:middlewares"
        assert {m["name"] for m in c["volumeMounts"]} == {"api-keys", "ca-bundle"}
        assert {v["name"] for v in pod["spec"]["volumes"]} == {"api-keys", "ca-bundle"}
    validate(rs)


def test_a_limit_edit_changes_only_the_user_config():
    """Ray replaces replicas when an app's args change and reconfigures them when only a
    deployment's user_config does, so a serving-limit edit must stay out of the args."""
    rel = release()
    before = yaml.safe_load(builders.build_serve_config(rel, version="3", settings=SETTINGS))["applications"][0]
    rel.spec.serving.max_new_tokens, rel.spec.serving.max_batch_size = 64, 4
    after = yaml.safe_load(builders.build_serve_config(rel, version="3", settings=SETTINGS))["applications"][0]
    assert after["args"] == before["args"]
    assert after["deployments"][0]["user_config"]["max_new_tokens"] == 64
    assert after["deployments"][0]["user_config"]["max_batch_size"] == 4


def test_a_canary_serves_beside_the_stable_version_and_its_weight_reconfigures_only_the_router():
    rel = release()
    rel.spec.rollout.strategy = "Canary"
    rs = builders.build_rayservice(rel, version="2", settings=SETTINGS, canary="3", weight=25)
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["model_uri"] == "models:/fim-debug/2" and app["args"]["router"] is True
    assert app["args"]["canary_model_uri"] == "models:/fim-debug/3" and "canary_weight" not in app["args"]
    names = [d["name"] for d in app["deployments"]]
    assert names == ["InfillServer", "InfillCanary", "CanaryRouter"]
    assert app["deployments"][2]["user_config"] == {"weight": 25}
    annotations = rs["metadata"]["annotations"]
    assert (annotations["midfill.dev/canary-version"], annotations["midfill.dev/canary-weight"]) == ("3", "25")
    # The canary's replicas come from the autoscaling bounds: room for maxReplicas more worker pods.
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 2 * 4
    # The next step changes the router's user_config and nothing in the args.
    patch = builders.version_patch(rel, version="2", settings=SETTINGS, rollout_start="t", canary="3", weight=50)
    (next_app,) = yaml.safe_load(patch["spec"]["serveConfigV2"])["applications"]
    assert next_app["args"] == app["args"] and next_app["deployments"][2]["user_config"] == {"weight": 50}
    # No canary: the router alone in front of the stable deployment, the annotation emptied (not removed).
    alone = builders.version_patch(rel, version="3", settings=SETTINGS, rollout_start="t")
    (alone_app,) = yaml.safe_load(alone["spec"]["serveConfigV2"])["applications"]
    assert [d["name"] for d in alone_app["deployments"]] == ["InfillServer", "CanaryRouter"]
    assert alone["metadata"]["annotations"]["midfill.dev/canary-version"] == ""
