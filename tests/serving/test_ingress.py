"""The endpoint on a real local Ray Serve, driven by the unmodified `openai` client (one app per module)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from ray_helpers import local_serve

from midfill.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from serving.app import build_app
from serving.engine import Engine, SamplingParams
from serving.settings import ServingSettings

KEY = "sk-test-0123456789"
PREFIX = "def mean(values):\n    total = 0\n    for v in values:\n        "
SUFFIX = "\n    return total / len(values)\n"


@pytest.fixture(scope="module")
def server_args(tiny_export, tmp_path_factory) -> dict:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# team keys\n{KEY}\nsk-other\n")
    return {
        "model_uri": str(tiny_export),
        "served_model_name": "tiny",
        "api_keys_file": str(keys),
        "max_new_tokens": 200,
        "max_ongoing_requests": 40,
        "max_queued_requests": 4,
        "max_batch_size": 12,
        "max_prefill_tokens": 1024,
        "prefix_cache_tokens": 4096,
    }


@pytest.fixture(scope="module")
def server(server_args, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("MIDFILL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    with local_serve(build_app(server_args)) as url:
        yield url


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def reference(tiny_export):
    # The dtype the endpoint runs in (ServingSettings: bfloat16 on CPUs that have it).
    eng = Engine.from_export(tiny_export, dtype=ServingSettings().device_and_dtype()[1], max_batch_size=4)
    yield eng
    eng.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def _greedy(client, **kw):
    return client.completions.create(model="tiny", temperature=0, **kw)


def test_suffix_mode_applies_the_models_template(client, reference):
    out = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=12)
    expected = reference.infill(PREFIX, SUFFIX, SamplingParams(max_tokens=12))
    choice = out.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == expected.prompt_tokens
    assert out.usage.completion_tokens == expected.completion_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == "tiny" and out.object == "text_completion"


def test_a_resent_file_reports_cached_prompt_tokens_in_usage(client, reference):
    # An editor resends the file as the user types: the second prompt starts like the first.
    body = (
        "import os\n\n\ndef walk(top):\n    # Yield every file under top.\n    for root, dirs, files in os.walk(top):\n"
    )
    first = _greedy(client, prompt=body + "        for ", suffix=SUFFIX, max_tokens=6)
    second = _greedy(client, prompt=body + "        for name", suffix=SUFFIX, max_tokens=6)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    expected = reference.infill(body + "        for name", SUFFIX, SamplingParams(max_tokens=6))
    assert second.choices[0].text == expected.text


def test_raw_starcoder_template_is_translated_to_the_native_format(client):
    raw = _greedy(client, prompt=f"{FIM_PREFIX}{PREFIX}{FIM_SUFFIX}{SUFFIX}{FIM_MIDDLE}", max_tokens=12)
    with_suffix = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=12)
    assert raw.choices[0].text == with_suffix.choices[0].text
    assert raw.usage.prompt_tokens == with_suffix.usage.prompt_tokens


def test_streaming_with_usage_ends_with_done(client, server):
    chunks = list(
        _greedy(
            client, prompt=PREFIX, suffix=SUFFIX, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    whole = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=16)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # The wire format itself: SSE events, the last one [DONE].
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_strings_cut_the_completion(client):
    full = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=40).choices[0].text
    stop = full[8:11]
    out = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=40, stop=["\n\n\n\n", stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[: full.index(stop)]
    streamed = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=40, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_max_tokens_is_honoured(client):
    out = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=7)
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == 256
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok"
    # Ready means loaded and warmed up; /health names what is served (a local folder: version "local").
    assert health["ready"] is True and health["version"] == "local" and health["warmup_seconds"] > 0
    assert health["registered_model"] == models.data[0].model_extra["lineage"]["registered_model"]
    assert health["decode_path"] == "cpu"  # which decode path serves (cuda-graphs / eager on a GPU)
    # The reloadable settings reach the engine: the constructor applies the initial ones, Ray's
    # reconfigure() right after it the user_config.
    assert health["limits"] == {
        "max_batch_size": 12,
        "max_prefill_tokens": 1024,
        "prefix_cache_tokens": 4096,
        "max_new_tokens": 200,
        "max_context_tokens": 256,
    }
    metrics = httpx.get(f"{server}/metrics").text
    for name in (
        "midfill_requests_total",
        "midfill_request_latency_seconds",
        "midfill_generated_tokens_total",
        "midfill_queue_depth",
    ):
        assert name in metrics


def _post(server, body, *, key: str | None = KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(
            f"{server}/v1/completions", content=raw, headers={**headers, "content-type": "application/json"}, timeout=60
        )
    return httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("case", "status", "param"),
    [
        ("bad_json", 400, None),
        ("wrong_type", 422, "max_tokens"),
        ("prompt_too_long", 413, "prompt"),
        ("max_tokens_zero", 422, "max_tokens"),
        ("max_tokens_above_limit", 400, "max_tokens"),
        ("max_tokens_past_context", 400, "max_tokens"),
        ("n_two", 400, "n"),
        ("unknown_model", 404, "model"),
        ("wrong_key", 401, None),
        ("missing_key", 401, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, case, status, param):
    ok = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4, "temperature": 0}
    r = {
        "bad_json": lambda: _post(server, None, raw=b'{"prompt": "x", '),
        "wrong_type": lambda: _post(server, {**ok, "max_tokens": "ten"}),
        "prompt_too_long": lambda: _post(server, {**ok, "prompt": "x = 1\n" * 400}),
        "max_tokens_zero": lambda: _post(server, {**ok, "max_tokens": 0}),
        "max_tokens_above_limit": lambda: _post(server, {**ok, "max_tokens": 10_000}),
        "max_tokens_past_context": lambda: _post(server, {**ok, "prompt": "x = 1\n" * 40, "max_tokens": 200}),
        "n_two": lambda: _post(server, {**ok, "n": 2}),
        "unknown_model": lambda: _post(server, {**ok, "model": "gpt-4"}),
        "wrong_key": lambda: _post(server, ok, key="sk-wrong"),
        "missing_key": lambda: _post(server, ok, key=None),
    }[case]()
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["param"] == param
    # ... and the next good request is served.
    assert _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=2).usage.completion_tokens == 2


def test_openai_client_raises_typed_errors(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    good = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        good.completions.create(model="tiny", prompt="x", max_tokens=1, n=3)


def test_unknown_fields_are_ignored_and_x_api_key_works(server):
    body = {"prompt": PREFIX, "max_tokens": 2, "temperature": 0, "user": "me", "some_future_option": {"a": 1}}
    r = httpx.post(f"{server}/v1/completions", json=body, headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_32_concurrent_streaming_clients_complete_without_errors(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.completions.create(
            model="tiny",
            prompt=PREFIX + f"x{i} = ",
            suffix=SUFFIX,
            max_tokens=24,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, used = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return text, used

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(used >= 1 for _, used in results)


def _idle_health(server: str, timeout_s: float = 120) -> dict:
    """/health once the replica runs and queues nothing (bounded)."""
    deadline = time.monotonic() + timeout_s
    while (health := httpx.get(f"{server}/health").json())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_client_disconnect_cancels_generation(server, client):
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 200, "temperature": 0, "stream": True}
    control = _greedy(client, prompt=PREFIX, suffix=SUFFIX, max_tokens=200)
    assert (control.choices[0].finish_reason, control.usage.completion_tokens) == ("length", 200)
    before = _idle_health(server)["decode_steps"]
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
        first = next(line for line in r.iter_lines() if line)
        assert json.loads(first.removeprefix("data: "))["choices"]
    # The stream was closed after one event: the engine drops the request instead of running the
    # other ~199 steps (a few run while the disconnect travels through Ray's proxy).
    steps = _idle_health(server)["decode_steps"] - before
    assert steps < 100, steps
    assert 'status="499"' in httpx.get(f"{server}/metrics").text


def test_over_capacity_gets_429_with_retry_after(server):
    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"x-api-key": KEY}) as c:
            body = {"prompt": PREFIX, "max_tokens": 150, "temperature": 0}
            return await asyncio.gather(*(c.post(f"{server}/v1/completions", json=body) for _ in range(50)))

    responses = asyncio.run(main())
    statuses = sorted({r.status_code for r in responses})
    unexpected = [(r.status_code, r.text[:300]) for r in responses if r.status_code not in (200, 429)]
    assert statuses == [200, 429], unexpected
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] and limited.json()["error"]["code"] == "rate_limit_exceeded"


def _redeploy(server_args: dict) -> None:
    from ray import serve

    serve.run(build_app(server_args), name="midfill", route_prefix="/", blocking=False)


def _deploy_config(args: dict, **limits) -> None:
    """Deploy from a serve config (as a RayService does) with the reloadable settings in the
    deployment's user_config: Ray hashes the app's import path and args into its code version, so
    only a change confined to user_config reaches the running replica as reconfigure().
    (serve.run from Python gives every deploy a new code version, which replaces the replica.)"""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from midfill.serve_args import ServeArgs
    from serving.ingress import RELOADABLE

    user_config = {k: getattr(ServeArgs.model_validate({**args, **limits}), k) for k in RELOADABLE}
    app = {
        "name": "midfill",
        "route_prefix": "/",
        "import_path": "serving.app:build_app",
        "args": args,
        "deployments": [{"name": "InfillServer", "user_config": user_config}],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))


def _health_when(server: str, done, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = httpx.get(f"{server}/health", timeout=10).json()
            if done(health):
                return health
        except (httpx.HTTPError, ValueError):
            pass
        assert time.monotonic() < deadline, "the deployment did not reach the expected state"
        time.sleep(0.2)


def test_reconfigure_changes_limits_without_replacing_the_replica(server, server_args):
    first = httpx.get(f"{server}/health").json()["replica"]
    _deploy_config(server_args)  # from a Python deploy to a config deploy: one replacement
    replica = _health_when(server, lambda h: h.get("status") == "ok" and h["replica"] != first)["replica"]
    try:
        _deploy_config(server_args, max_new_tokens=50)
        health = _health_when(server, lambda h: h.get("limits", {}).get("max_new_tokens") == 50)
        assert health["replica"] == replica  # reconfigured in place, not replaced
        r = _post(server, {"prompt": PREFIX, "max_tokens": 100})
        assert r.status_code == 400 and "limit of 50" in r.json()["error"]["message"]
        assert (
            _post(server, {"prompt": PREFIX, "max_tokens": 50, "temperature": 0}).status_code == 200
        )  # at the new limit
    finally:
        _deploy_config(server_args)
        _health_when(server, lambda h: h.get("limits", {}).get("max_new_tokens") == 200)


@pytest.mark.slow
def test_swapping_the_model_version_drops_no_requests(server, server_args, tiny_export, tmp_path_factory):
    import shutil

    v2 = tmp_path_factory.mktemp("v2") / "tiny"
    shutil.copytree(tiny_export, v2)

    async def traffic(stop: asyncio.Event) -> list[int]:
        statuses = []
        async with httpx.AsyncClient(timeout=120, headers={"x-api-key": KEY}) as c:

            async def one() -> None:
                body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 40, "temperature": 0}
                statuses.append((await c.post(f"{server}/v1/completions", json=body)).status_code)

            while not stop.is_set():
                await asyncio.gather(*(one() for _ in range(4)))
        return statuses

    async def main() -> list[int]:
        stop = asyncio.Event()
        task = asyncio.create_task(traffic(stop))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(_redeploy, {**server_args, "model_uri": str(v2)})
        for _ in range(200):  # until the new replica answers
            if httpx.get(f"{server}/health").json().get("source") == str(v2):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        return await task

    statuses = asyncio.run(main())
    assert httpx.get(f"{server}/health").json()["source"] == str(v2)
    assert len(statuses) >= 8 and set(statuses) == {200}, statuses
