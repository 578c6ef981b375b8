"""The canary router (serving.canary): routing by weight, sticky per user or API key, the version
named in every answer, and per-version numbers on /health.

Live part: a real MLflow registry (SQLite) with two versions of the tiny model, the router app on
a local Ray Serve, the `openai` client; version 2 is the canary at 30%.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from ray_helpers import local_serve

from midfill.apikeys import KeyFile
from midfill.registry import Registry
from midfill.serve_args import ServeArgs
from serving.app import build_app
from serving.canary import VersionNumbers, bucket, goes_to_canary, routing_key
from serving.lineage import VERSION_HEADER

MODEL = "tiny-coder"
WEIGHT = 30
PREFIX, SUFFIX = "def mean(values):\n    total = 0\n    ", "\n    return total / len(values)\n"


@pytest.mark.parametrize("weight", [5, 25, 50, 90])
def test_the_share_of_keys_routed_to_the_canary_is_the_weight(weight):
    keys = [f"user:editor-{i}" for i in range(20000)]
    share = 100 * sum(goes_to_canary(k, weight) for k in keys) / len(keys)
    assert abs(share - weight) < 1.5
    assert not any(goes_to_canary(k, 0) for k in keys[:1000])
    assert all(goes_to_canary(k, 100) for k in keys[:1000])


def test_routing_is_sticky_per_user_field_then_api_key():
    headers = {"authorization": "Bearer sk-one"}
    assert routing_key(headers, b'{"user": "ada", "prompt": "x"}') == "user:ada"
    assert routing_key(headers, b'{"prompt": "x"}') == "key:sk-one"
    assert routing_key({}, b"not json").startswith("anon:")
    assert bucket("user:ada") == bucket("user:ada")  # a stable hash, not Python's per-process hash()


def test_version_numbers():
    numbers = VersionNumbers()
    for i in range(20):
        numbers.record(
            status=200, latency_ms=float(i + 1), finish_reason="stop" if i % 4 else "length", completion_tokens=4
        )
    numbers.record(status=500, latency_ms=100.0, finish_reason="error", completion_tokens=0)
    assert numbers.as_dict() == {
        "requests": 21,
        "errors": 1,
        "p95_latency_ms": 20.0,
        "own_stop_rate": 0.75,
        "mean_completion_tokens": 4.0,
    }


def test_canary_args_must_name_the_router():
    with pytest.raises(ValueError, match="router: true"):
        ServeArgs(model_uri="x", auth_disabled=True, canary_model_uri="y")


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    kf = KeyFile(tmp_path_factory.mktemp("keys") / "api-keys")
    return kf, kf.create("team")


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory, key):
    registry = Registry(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    exp = registry.experiment_id("canary-test")
    for attempt in (1, 2):
        run = registry.client.create_run(exp, run_name=f"train-{attempt}")
        registry.register(name=MODEL, source=str(tiny_export), run_uid=f"uid-{attempt}", run_id=run.info.run_id)
    args = ServeArgs(
        model_uri=f"models:/{MODEL}/1",
        tracking_uri=registry.tracking_uri,
        api_keys_file=str(key[0].path),
        max_new_tokens=16,
        router=True,
        canary_model_uri=f"models:/{MODEL}/2",
        canary_weight=WEIGHT,
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("MIDFILL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    try:
        with local_serve(build_app(args), num_cpus=4) as url:
            yield url
    finally:
        mp.undo()


def _version(server: str, api_key: str, user: str, *, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0, timeout=120)
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=2, temperature=0, user=user, stream=stream
    )
    if stream:
        assert [c.system_fingerprint for c in raw.parse()]  # the stream reaches the client whole
    return raw.headers[VERSION_HEADER].rpartition("/")[2]


@pytest.mark.slow
def test_the_observed_canary_share_is_the_weight_and_each_user_stays_on_one_version(server, key):
    users = [f"editor-{i}" for i in range(300)]
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda u: _version(server, key[1], u), users))
    assert set(versions) == {"1", "2"}
    share = 100 * versions.count("2") / len(versions)
    assert abs(share - WEIGHT) < 6, share
    for user, version in zip(users[:5], versions[:5], strict=True):
        assert _version(server, key[1], user, stream=True) == version  # sticky, streams too
    health = httpx.get(f"{server}/health", timeout=30).json()
    assert health["version"] == "1" and health["ready"] is True
    assert health["canary"] == {"version": "2", "weight": WEIGHT, "ready": True}
    counted = health["versions"]
    assert counted["1"]["requests"] + counted["2"]["requests"] == len(users) + 5
    assert counted["2"]["errors"] == 0 and counted["2"]["p95_latency_ms"] > 0
    assert counted["2"]["mean_completion_tokens"] is not None
    refused = httpx.post(f"{server}/v1/completions", json={"prompt": "x"}, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_the_router_admits_what_both_model_deployments_admit():
    from serving.app import deployment_options, router_options

    args = ServeArgs(model_uri="x", auth_disabled=True, max_replicas=3, router=True, canary_weight=10)
    options = router_options(args)
    assert options["max_ongoing_requests"] == 2 * 3 * deployment_options(args)["max_ongoing_requests"]
    assert options["num_replicas"] == 1 and options["user_config"] == {"weight": 10}
