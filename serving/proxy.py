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

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["started"] = True
                headers = dict(message.get("headers") or [])
                seen["event_stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["finished"] = True
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:  # noqa: BLE001 - the proxy failed the request: answer it below, not with a bare 500
            log.exception("midfill: the proxy raised while forwarding %s", scope.get("path"))
        if not seen["started"]:
            await self._unavailable(send)
        elif seen["event_stream"] and not seen["finished"]:
            event = f"data: {json.dumps(_lost_body())}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": False})

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
