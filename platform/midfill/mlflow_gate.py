"""`midfill mlflow-gate`: authentication and the approval rule in front of an MLflow server.

The chart runs it beside `mlflow server` (which then listens on localhost only), so everything
that reaches MLflow comes through here. Three credentials (HTTP basic auth, one Secret each):

- `reviewer`: everything, and alone the approval: the `review` tag of a model version, aliases,
  stage transitions, deleting versions or models;
- `trainer`: everything else: create runs, log metrics and artifacts, register versions, tag them
  (evaluation results);
- `operator`: read, and end runs (`runs/update`: the MLflow run of a failed attempt is ended FAILED).

Without credentials only reads pass, and only when anonymous reads are allowed (the serving pods
download the approved model with no credentials); `/health` always passes (the kubelet's probes).

MLflow's own basic-auth app was not enough: its permissions are per experiment and registered model
(READ/EDIT/MANAGE), and registering a version and approving it both need EDIT on the same model, so
the trainer could approve what it registered.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from midfill.registry import REVIEW_TAG

ROLES = ("operator", "trainer", "reviewer")
_API_PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/", "/api/2.0/preview/mlflow/")
# Approval: which version is served depends on these (midfill.registry.unmet_approval, aliases).
_APPROVAL_ENDPOINTS = {
    "registered-models/alias",
    "model-versions/transition-stage",
    "model-versions/delete",
    "registered-models/delete",
    "registered-models/rename",
}
_TAG_ENDPOINTS = {"model-versions/set-tag", "model-versions/delete-tag"}
_OPERATOR_WRITES = {"runs/update"}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


@dataclass(frozen=True)
class GateSettings:
    """Where to forward, and the credentials (env MIDFILL_GATE_<ROLE>_USERNAME / _PASSWORD)."""

    upstream: str
    users: dict[str, tuple[str, str]]  # role -> (username, password)
    anonymous_read: bool = True

    @classmethod
    def from_env(cls, upstream: str, anonymous_read: bool) -> GateSettings:
        users: dict[str, tuple[str, str]] = {}
        for role in ROLES:
            user = os.environ.get(f"MIDFILL_GATE_{role.upper()}_USERNAME", "")
            password = os.environ.get(f"MIDFILL_GATE_{role.upper()}_PASSWORD", "")
            if not user or not password:
                raise ValueError(
                    f"MIDFILL_GATE_{role.upper()}_USERNAME and _PASSWORD must both be set (the {role} credentials: "
                    f"the chart reads them from the Secret mlflow.auth.{role}Secret)"
                )
            users[role] = (user, password)
        if len({u for u, _ in users.values()}) != len(users):
            raise ValueError("the operator, trainer and reviewer credentials must have different usernames")
        return cls(upstream=upstream.rstrip("/"), users=users, anonymous_read=anonymous_read)


def role_of(settings: GateSettings, authorization: str | None) -> str | None:
    """The role whose basic-auth credentials these are, else None (compared in constant time)."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(authorization[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    for role, (want_user, want_password) in settings.users.items():
        same_user = hmac.compare_digest(user.encode(), want_user.encode())
        if same_user & hmac.compare_digest(password.encode(), want_password.encode()):
            return role
    return None


def endpoint_of(path: str) -> str | None:
    """`/api/2.0/mlflow/model-versions/set-tag` -> `model-versions/set-tag`; None outside the REST API."""
    for prefix in _API_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) :].strip("/")
    return None


def is_read(method: str, endpoint: str | None) -> bool:
    if method in ("GET", "HEAD", "OPTIONS"):
        return True
    # MLflow's searches and bulk reads are POSTs.
    return endpoint is not None and method == "POST" and (endpoint.endswith("search") or "/get-" in endpoint)


def touches_approval(endpoint: str | None, body: Any) -> bool:
    """Whether a request sets or removes what decides which version may be served."""
    if endpoint is None:
        return False
    if endpoint in _APPROVAL_ENDPOINTS:
        return True
    if not isinstance(body, dict):
        return endpoint in _TAG_ENDPOINTS  # an unreadable tag request: treat it as the review tag
    if endpoint in _TAG_ENDPOINTS:
        return body.get("key") == REVIEW_TAG
    if endpoint == "model-versions/create":
        return any(isinstance(t, dict) and t.get("key") == REVIEW_TAG for t in body.get("tags") or [])
    return False


def decide(role: str | None, method: str, path: str, body: Any, *, anonymous_read: bool) -> tuple[int, str] | None:
    """None to forward the request, else (HTTP status, why) to refuse it."""
    if path == "/health":
        return None
    endpoint = endpoint_of(path)
    read = is_read(method, endpoint)
    if role is None:
        if read and anonymous_read:
            return None
        return 401, "authenticate with the operator, trainer or reviewer credentials (HTTP basic auth)"
    if role == "reviewer" or read:
        return None
    if role == "operator":
        if endpoint in _OPERATOR_WRITES:
            return None
        return 403, f"the operator credentials may only read and end runs, not {method} {path}"
    if touches_approval(endpoint, body):
        return 403, (
            f"only reviewers may approve ({REVIEW_TAG!r} tag, aliases, stages, deletions); "
            f"{method} {path} was refused for the {role} credentials"
        )
    return None


def make_app(settings: GateSettings):
    """The aiohttp application: check each request, then stream it to MLflow and the answer back."""
    import aiohttp
    from aiohttp import web

    async def session_ctx(app: web.Application):
        app["session"] = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        yield
        await app["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        role = role_of(settings, request.headers.get("Authorization"))
        endpoint = endpoint_of(request.path)
        body: bytes | None = None
        parsed: Any = None
        if endpoint is not None and request.method not in ("GET", "HEAD"):
            body = await request.read()  # REST calls are small JSON; artifact uploads are streamed below
            try:
                parsed = json.loads(body or b"{}")
            except ValueError:
                parsed = None
        refusal = decide(role, request.method, request.path, parsed, anonymous_read=settings.anonymous_read)
        if refusal is not None:
            status, why = refusal
            headers = {"WWW-Authenticate": 'Basic realm="mlflow"'} if status == 401 else {}
            payload = {"error_code": "PERMISSION_DENIED" if status == 403 else "UNAUTHENTICATED", "message": why}
            return web.json_response(payload, status=status, headers=headers)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | {"authorization"}}
        headers["Host"] = request.headers.get("Host", "")
        data: Any = body if body is not None else (request.content if request.can_read_body else None)
        async with request.app["session"].request(
            request.method, settings.upstream + request.rel_url.path_qs, headers=headers, data=data
        ) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=1024**3)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def serve(settings: GateSettings, *, host: str, port: int) -> None:
    from aiohttp import web

    web.run_app(make_app(settings), host=host, port=port, print=None, access_log=None)
