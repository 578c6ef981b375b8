"""Who answered and who asked, through the real endpoint (local Ray Serve, `openai` client).

Served from a real MLflow registry (SQLite): two versions of one model, each tagged with its lineage
as the trainer tags it. Three named keys: alice and bob without limits, noisy with rpm=2.
"""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
import typer
from ray_helpers import local_serve
from typer.testing import CliRunner

from midfill.apikeys import KeyFile
from midfill.local.keys_cli import register as register_keys_cli
from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, Registry
from serving.app import build_app
from serving.auth import KeyStore
from serving.lineage import VERSION_HEADER

MODEL = "tiny-coder"
PREFIX = "def mean(values):\n    total = 0\n    for v in values:\n        "
SUFFIX = "\n    return total / len(values)\n"


@pytest.fixture(scope="module")
def registry(tiny_export, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    reg = Registry(uri)
    exp = reg.experiment_id("lineage-test")
    for attempt, data_hash in ((1, "aaaa1111aaaa1111"), (2, "bbbb2222bbbb2222")):
        run = reg.client.create_run(exp, run_name=f"train-{attempt}")
        reg.register(
            name=MODEL,
            source=str(tiny_export),
            run_uid=f"uid-{attempt}",
            run_id=run.info.run_id,
            tags={TAG_RUN_NAME: f"train-{attempt}", TAG_ATTEMPT: str(attempt), TAG_DATA_HASH: data_hash},
        )
    return reg


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The key file and the raw keys it was made with (stored only as digests)."""
    kf = KeyFile(tmp_path_factory.mktemp("keys") / "api-keys")
    raw = {"alice": kf.create("alice"), "bob": kf.create("bob"), "noisy": kf.create("noisy", rpm=2)}
    return kf, raw


@pytest.fixture(scope="module")
def server_args(registry, keys) -> dict:
    return {
        "model_uri": f"models:/{MODEL}/1",
        "tracking_uri": registry.tracking_uri,
        "api_keys_file": str(keys[0].path),
        "max_new_tokens": 64,
        "max_ongoing_requests": 16,
    }


@pytest.fixture(scope="module")
def server(server_args, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MIDFILL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    try:
        with local_serve(build_app(server_args)) as url:
            yield url
    finally:
        mp.undo()


def _client(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=60)


def _complete(server: str, key: str, **kw):
    """(completion, response headers) for one greedy infill."""
    raw = _client(server, key).completions.with_raw_response.create(
        model=MODEL, prompt=PREFIX, suffix=SUFFIX, temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw
    )
    return raw.parse(), raw.headers


def _key_metrics(server: str) -> dict[tuple[str, str, str], float]:
    """{(metric, key, model_version[, status]): value} for the midfill_key_* counters."""
    out = {}
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        m = re.match(r"^(midfill_key_\w+)_total\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
            out[(m[1], labels["key"], labels["model_version"], labels.get("status", ""))] = float(m[3])
    return out


def test_responses_name_the_version_and_models_lists_its_lineage(server, keys, registry):
    completion, headers = _complete(server, keys[1]["alice"])
    assert headers[VERSION_HEADER] == f"{MODEL}/1" and completion.system_fingerprint == f"{MODEL}/1"

    stream = _client(server, keys[1]["alice"]).completions.create(
        model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks and {c.system_fingerprint for c in chunks} == {f"{MODEL}/1"}

    r = httpx.get(f"{server}/v1/models", headers={"x-api-key": keys[1]["bob"]})
    entry = r.json()["data"][0]
    info = registry.get(MODEL, version=1)
    assert entry["version"] == "1" and r.headers[VERSION_HEADER] == f"{MODEL}/1"
    assert entry["lineage"] == {
        "registered_model": MODEL,
        "version": "1",
        "training_run": info.tags[TAG_RUN_NAME],
        "training_run_uid": info.tags["midfill.training_run_uid"],
        "attempt": int(info.tags[TAG_ATTEMPT]),
        "data_hash": info.tags[TAG_DATA_HASH],
        "mlflow_run_id": info.run_id,
        "source": f"models:/{MODEL}/1",
    }


def test_usage_is_counted_per_key_name_exactly_as_returned(server, keys):
    before = _key_metrics(server)
    sent = {"alice": [0, 0, 0], "bob": [0, 0, 0]}
    for name, max_tokens in (("alice", 5), ("bob", 9), ("alice", 7), ("alice", 3)):
        completion, _ = _complete(server, keys[1][name], max_tokens=max_tokens)
        u = completion.usage
        for i, n in enumerate((1, u.prompt_tokens, u.completion_tokens)):
            sent[name][i] += n
    after = _key_metrics(server)
    for name, (requests, prompt, generated) in sent.items():

        def delta(metric, status="", name=name):
            key = (metric, name, f"{MODEL}/1", status)
            return after.get(key, 0) - before.get(key, 0)

        assert delta("midfill_key_requests", "200") == requests
        assert delta("midfill_key_prompt_tokens") == prompt
        assert delta("midfill_key_completion_tokens") == generated
    text = httpx.get(f"{server}/metrics").text
    assert all(raw not in text for raw in keys[1].values())  # names only, never a key

    # `midfill usage --url` prints the same numbers, one row per key name and version.
    app = typer.Typer()
    register_keys_cli(app)
    table = CliRunner().invoke(app, ["usage", "--url", server]).output
    row = next(line.split() for line in table.splitlines() if line.startswith("alice "))
    assert row[1] == f"{MODEL}/1"
    assert int(row[2]) == after[("midfill_key_requests", "alice", f"{MODEL}/1", "200")]
    assert int(row[5]) == after[("midfill_key_completion_tokens", "alice", f"{MODEL}/1", "")]


def test_a_limited_key_gets_429_while_others_are_served(server, keys):
    statuses = []
    for _ in range(4):
        try:
            _complete(server, keys[1]["noisy"], max_tokens=2)
            statuses.append(200)
        except openai.RateLimitError as exc:
            statuses.append(429)
            assert int(exc.response.headers["retry-after"]) >= 1
            assert "'noisy'" in exc.message and keys[1]["noisy"] not in exc.message
        completion, _ = _complete(server, keys[1]["bob"], max_tokens=2)
        assert completion.choices[0].finish_reason in ("stop", "length")
    assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]
    assert _key_metrics(server)[("midfill_key_requests", "noisy", f"{MODEL}/1", "429")] == 2


def test_revoking_one_key_leaves_the_other_working_without_a_restart(server, keys):
    kf, raw = keys
    started = httpx.get(f"{server}/health").json()["started"]
    kf.revoke("bob")
    deadline = time.monotonic() + KeyStore.RECHECK_S + 10
    while True:
        try:
            _complete(server, raw["bob"], max_tokens=1)
        except openai.AuthenticationError as exc:
            assert raw["bob"] not in str(exc)
            break
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.5)
    completion, _ = _complete(server, raw["alice"], max_tokens=2)
    assert completion.usage.completion_tokens >= 1
    assert httpx.get(f"{server}/health").json()["started"] == started  # the same replica


@pytest.mark.slow
def test_after_a_swap_responses_name_the_new_version(server, server_args, keys):
    from ray import serve

    serve.run(
        build_app({**server_args, "model_uri": f"models:/{MODEL}/2"}), name="midfill", route_prefix="/", blocking=False
    )
    deadline = time.monotonic() + 180
    while httpx.get(f"{server}/health").json().get("source") != f"models:/{MODEL}/2":
        assert time.monotonic() < deadline, "the new version never answered"
        time.sleep(0.3)
    completion, headers = _complete(server, keys[1]["alice"])
    assert headers[VERSION_HEADER] == f"{MODEL}/2" and completion.system_fingerprint == f"{MODEL}/2"
    lineage = httpx.get(f"{server}/v1/models", headers={"x-api-key": keys[1]["alice"]}).json()["data"][0]["lineage"]
    assert lineage["training_run"] == "train-2" and lineage["data_hash"] == "bbbb2222bbbb2222"
