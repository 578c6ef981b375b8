"""serving.proxy's middleware without Ray: apps standing in for Ray's proxy when a replica died
(nothing sent, or a stream cut short) and when it answered (passed through untouched).
test_replica_faults.py checks the same against a real replica SIGKILLed under load."""

from __future__ import annotations

import asyncio
import json

from serving.proxy import ReplicaLostMiddleware


def _run(app) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(ReplicaLostMiddleware(app)(scope, receive, send))
    return sent


async def _silent(scope, receive, send) -> None:
    """Ray's proxy when the replica died before answering: it sends nothing."""


async def _cut_stream(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})


async def _answered(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 429, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"error": {}}', "more_body": False})


def test_no_answer_becomes_a_retryable_503_in_openai_shape():
    start, body = _run(_silent)
    assert start["status"] == 503 and (b"retry-after", b"5") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["code"] == "replica_lost" and "retry" in error["message"]


def test_a_cut_event_stream_ends_with_an_error_event():
    *_, last = _run(_cut_stream)
    assert last["more_body"] is False
    event = json.loads(last["body"].decode().removeprefix("data: "))
    assert event["error"]["code"] == "replica_lost"


def test_an_answer_passes_through_untouched():
    start, body = _run(_answered)
    assert start["status"] == 429 and body["body"] == b'{"error": {}}'


def _ray_says(status: int, text: bytes, extra: list | None = None):
    """Ray's proxy answering by itself (its request timeout, its full queue): plain text."""

    async def app(scope, receive, send) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": text, "more_body": False})

    return app


def test_rays_own_plain_text_answers_become_openai_shaped_with_status_and_retry_after_kept():
    start, body = _run(_ray_says(408, b"Request abc timed out after 30.0s."))
    assert start["status"] == 408 and (b"content-type", b"application/json") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["code"] == "request_timeout" and "timed out after 30.0s" in error["message"]
    start, body = _run(_ray_says(429, b"Request dropped due to backpressure", [(b"retry-after", b"2")]))
    assert start["status"] == 429 and (b"retry-after", b"2") in start["headers"]
    assert json.loads(body["body"])["error"]["type"] == "rate_limit_error"
    start, body = _run(_ray_says(503, b"Deployment 'infill' is unavailable"))
    assert start["status"] == 503 and json.loads(body["body"])["error"]["code"] == "deployment_unavailable"
    assert int(dict(start["headers"])[b"content-length"]) == len(body["body"])
