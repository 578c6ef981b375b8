"""What Ray Serve's HTTP proxy answers when a replica dies under a request (SIGKILL, OOM, a lost node).

The replica's own routes answer every error in OpenAI's shape, but a replica that is gone answers
nothing: Ray's proxy then sends no response at all for a request that had not started (uvicorn
fills in a plain-text `500 Internal Server Error`), and cuts a stream that had. Neither tells a
client that a retry will do. This middleware runs inside Ray's proxy (Ray loads it from the import
path in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH; `midfill.serve_args.PROXY_ENV` is what every Ray
process of an endpoint is started with) and turns those into answers a client can act on:

- no response started: `503` with `Retry-After` and an OpenAI-shaped error (`code: replica_lost`);
- an event stream cut short: a last `data: {"error": ...}` event (what OpenAI's clients raise as an
  APIError), then a clean end, with no `[DONE]`.

Ray's proxy also answers some requests itself, in plain text: 408 (Ray's request timeout), 429 (its
queue is full, with `Retry-After`) and 503 (the deployment is unavailable). Those get the same
OpenAI-shaped body, Ray's words kept in the message, status and `Retry-After` unchanged, so every
error a client of the endpoint can see parses the same way.

Every answer the replica did give, errors included, passes through untouched. Serve replaces the
dead replica; requests that arrive meanwhile wait in Ray's queue for it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.protocol import error_body

log = logging.getLogger("ray.serve")

RETRY_AFTER_S = 5  # about a replica restart of a small model; a large one takes longer, clients back off
LOST = "the model server stopped before it answered (its replica was lost); retry shortly"


def middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ReplicaLostMiddleware)]


# Ray's own plain-text answers: status -> (OpenAI error type, code, what a client should do).
RAY_ANSWERS = {
    408: ("timeout", "request_timeout", "the endpoint's request timeout passed; retry, or ask for fewer tokens"),
    429: ("rate_limit_error", "queue_full", "the endpoint's queue is full; retry after the Retry-After seconds"),
    503: ("service_unavailable", "deployment_unavailable", "no replica can take the request now; retry shortly"),
}


def _ray_answer_body(status: int, said: bytes) -> bytes:
    type_, code, advice = RAY_ANSWERS[status]
    text = said.decode("utf-8", "replace").strip()[:300]
    return json.dumps(error_body(f"{text}: {advice}" if text else advice, type_=type_, code=code)).encode()


def _lost_body() -> dict[str, Any]:
    return error_body(LOST, type_="service_unavailable", code="replica_lost")


class ReplicaLostMiddleware:
    """Pure ASGI: watches what the proxy sends and finishes a response the replica never finished."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = {"started": False, "finished": False, "event_stream": False}
        held: dict[str, Any] = {}  # a plain-text answer of Ray's own, rewritten once its body is complete

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["started"] = True
                headers = dict(message.get("headers") or [])
                content_type = headers.get(b"content-type", b"")
                seen["event_stream"] = content_type.startswith(b"text/event-stream")
                if message["status"] in RAY_ANSWERS and not content_type.startswith(b"application/json"):
                    held.update(start=message, body=b"")
                    return
            elif message["type"] == "http.response.body":
                seen["finished"] = not message.get("more_body", False)
                if held:
                    held["body"] += message.get("body", b"")
                    if seen["finished"]:
                        await self._rewritten(send, held["start"], held["body"])
                    return
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:  # noqa: BLE001 - the proxy failed the request: answer it below, not with a bare 500
            log.exception("midfill: the proxy raised while forwarding %s", scope.get("path"))
        if not seen["started"]:
            await self._unavailable(send)
        elif held and not seen["finished"]:  # Ray's own answer, its body cut short: still answer it whole
            await self._rewritten(send, held["start"], held["body"])
        elif seen["event_stream"] and not seen["finished"]:
            event = f"data: {json.dumps(_lost_body())}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": False})

    @staticmethod
    async def _rewritten(send: Send, start: Message, said: bytes) -> None:
        body = _ray_answer_body(start["status"], said)
        kept = [(k, v) for k, v in start.get("headers") or [] if k.lower() == b"retry-after"]
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *kept]
        await send({"type": "http.response.start", "status": start["status"], "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    @staticmethod
    async def _unavailable(send: Send) -> None:
        body = json.dumps(_lost_body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
