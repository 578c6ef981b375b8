"""The canary router: one Serve application holding a stable and a canary model deployment.

spec.rollout.strategy: Canary serves through this router (serving.app:build_app with router: true).
Each completion goes to the canary when its routing key falls in the canary's share: the key is
the request's `user` field, else its API key, hashed (sha256) into one of 100 buckets, so one editor
stays on one version for the whole step (sticky) and the share of editors on the canary is the
weight. The answer is the model replica's own (its x-midfill-model-version header names the version).

The router counts, per version, what the replicas report for each request (status, finish reason,
completion tokens) and the latency it saw, since the current split was set: /health carries them
(`versions`), with the split itself (`canary`: version, weight, loaded), for the release controllers
to judge the canary on (midfill.lifecycle.canary). The weight travels in the router's user_config:
a new step reconfigures the router (and resets the numbers), never the model replicas.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type.
import asyncio
import hashlib
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from serving.auth import key_from_headers
from serving.protocol import error_body

router_api = FastAPI(title="midfill canary router", docs_url=None, redoc_url=None)
BUCKETS = 100
# Latencies kept per version for the p95 (the most recent ones).
LATENCY_WINDOW = 2000
# A deployment that does not answer /health in this time (still loading) is reported not ready.
HEALTH_TIMEOUT_S = 3.0
MAX_BODY_BYTES = 1 << 20


def bucket(key: str) -> int:
    """The routing bucket of a key, 0..99, the same in every process and on every run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % BUCKETS


def routing_key(headers: Any, body: bytes) -> str:
    """The request's `user` field, else its API key, else a random one (not sticky)."""
    try:
        user = json.loads(body).get("user")
    except (ValueError, AttributeError):
        user = None
    if isinstance(user, str) and user:
        return "user:" + user
    key = key_from_headers(headers)
    return "key:" + key if key else f"anon:{random.random()}"


def goes_to_canary(key: str, weight: int) -> bool:
    return bucket(key) < weight


@dataclass
class VersionNumbers:
    """One version's live numbers since the split was set."""

    requests: int = 0
    errors: int = 0
    own_stops: int = 0
    finished: int = 0
    completion_tokens: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def record(self, *, status: int, latency_ms: float, finish_reason: str | None, completion_tokens: int) -> None:
        self.requests += 1
        self.latencies_ms.append(latency_ms)
        if status >= 500:
            self.errors += 1
        if status == 200 and finish_reason in ("stop", "length"):
            self.finished += 1
            self.own_stops += finish_reason == "stop"
            self.completion_tokens += completion_tokens

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else None
        return {
            "requests": self.requests,
            "errors": self.errors,
            "p95_latency_ms": round(p95, 1) if p95 is not None else None,
            "own_stop_rate": round(self.own_stops / self.finished, 4) if self.finished else None,
            "mean_completion_tokens": round(self.completion_tokens / self.finished, 2) if self.finished else None,
        }


async def _within(response: Any, timeout: float) -> Any:
    """Await a handle's response, None if it does not answer in time (loading) or fails."""
    try:
        return await asyncio.wait_for(_await(response), timeout)
    except Exception:  # noqa: BLE001 - a loading or failed deployment is simply not ready
        response.cancel()
        return None


async def _await(response: Any) -> Any:
    return await response


@serve.deployment(name="CanaryRouter")
@serve.ingress(router_api)
class CanaryRouter:
    """Routes completions between the stable and the canary deployment by weight, sticky per key."""

    def __init__(self, stable: Any, canary: Any = None) -> None:
        self.stable, self.canary = stable, canary
        self.weight = 0
        self.numbers: dict[str, VersionNumbers] = {}
        self.versions: dict[str, str] = {}  # slot -> version, learnt from the replicas' answers

    def reconfigure(self, config: dict[str, Any]) -> None:
        weight = int(config.get("weight", 0))
        if not 0 <= weight <= 100:
            raise ValueError(f"user_config.weight: {weight} must be a percentage in 0..100")
        if weight != self.weight:
            self.numbers = {}  # a new step is judged on its own numbers
        self.weight = weight

    def _slot(self, headers: Any, body: bytes) -> tuple[str, Any]:
        if self.canary is not None and goes_to_canary(routing_key(headers, body), self.weight):
            return "canary", self.canary
        return "stable", self.stable

    @router_api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            body = body[: MAX_BODY_BYTES + 1]  # the replica answers 413
        slot, handle = self._slot(request.headers, body)
        start = time.monotonic()
        try:
            stream = handle.options(stream=True).forward.remote(dict(request.headers), body)
            head = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001 - the replica failed: a server error of that version
            self._record(slot, self.versions.get(slot, slot), start, {"status": 503})
            return JSONResponse(error_body(f"{slot} deployment failed: {exc}"[:300], type_="server_error"), 503)
        version = head["headers"].get("x-midfill-model-version", "").rpartition("/")[2] or slot
        self.versions[slot] = version
        headers = {k: v for k, v in head["headers"].items() if k not in ("content-length", "content-type")}
        if head["media_type"] == "text/event-stream":
            return StreamingResponse(
                self._relay(stream, slot, version, start),
                status_code=head["status"],
                headers=headers,
                media_type=head["media_type"],
            )
        chunks, report = [], {"status": head["status"]}
        try:
            async for item in stream:
                if isinstance(item, dict):
                    report = {**report, **item["report"]}
                else:
                    chunks.append(item)
        except Exception as exc:  # noqa: BLE001 - the replica failed mid-answer
            self._record(slot, version, start, {"status": 503})
            return JSONResponse(error_body(f"{slot} deployment failed: {exc}"[:300], type_="server_error"), 503)
        self._record(slot, version, start, report)
        return Response(b"".join(chunks), status_code=head["status"], headers=headers, media_type=head["media_type"])

    async def _relay(self, stream: Any, slot: str, version: str, start: float):
        report: dict[str, Any] = {"status": 200, "finish_reason": "cancelled"}
        try:
            async for item in stream:
                if isinstance(item, dict):
                    report.update(item["report"])
                else:
                    yield item
        except Exception:
            report["status"] = 503  # the replica failed mid-stream: the client sees the stream cut
            raise
        finally:
            self._record(slot, version, start, report)

    def _record(self, slot: str, version: str, start: float, report: dict[str, Any]) -> None:
        numbers = self.numbers.setdefault(version, VersionNumbers())
        numbers.record(
            status=int(report.get("status", 500)),
            latency_ms=(time.monotonic() - start) * 1000,
            finish_reason=report.get("finish_reason"),
            completion_tokens=int(report.get("completion_tokens") or 0),
        )

    @router_api.get("/health")
    async def health(self) -> JSONResponse:
        """The stable deployment's /health, with the split and each version's numbers."""
        stable = await _within(self.stable.health_info.remote(), HEALTH_TIMEOUT_S)
        code, body = stable if stable is not None else (503, {"status": "stable not answering", "ready": False})
        canary: dict[str, Any] = {"version": None, "weight": self.weight, "ready": False}
        if self.canary is not None:
            answer = await _within(self.canary.health_info.remote(), HEALTH_TIMEOUT_S)
            if answer is not None:
                canary.update(version=answer[1].get("version"), ready=answer[1].get("ready") is True)
        versions = {version: numbers.as_dict() for version, numbers in self.numbers.items()}
        return JSONResponse({**body, "canary": canary, "versions": versions}, status_code=code)

    @router_api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """The stable deployment's model list (the canary serves the same registered model)."""
        code, body = await self.stable.models_info.remote(dict(request.headers))
        return JSONResponse(body, status_code=code)
