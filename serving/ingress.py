"""The HTTP face of a replica: OpenAI-compatible /v1/completions, /v1/models, /health, /metrics.

One deployment holds both the routes and the engine: on a CPU, a second hop per streamed token costs
more than separate scaling would buy, and a replica is the unit that autoscales anyway.

Readiness means serving: the constructor loads the weights and runs one warm-up completion before
it returns, and Ray Serve routes nothing to a replica whose constructor has not returned. Ray never
restarts a replica for a slow constructor (it only logs that it is slow), while a failing
check_health makes Ray kill and restart the replica -- so loading in the background behind a health
check would either report a replica ready early or restart a slow one. A constructor that raises (a
corrupt export, out of memory) fails the replica; after Ray's retries the application is
DEPLOY_FAILED, and with max_surge_percent (serving.app) the old version's replicas keep serving
meanwhile. /health names the registry version the replica serves; the release controllers compare it
with the version they deployed before calling it Available.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the
# route methods, which Ray Serve rewraps.
import json
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from ray import serve

from midfill.apikeys import NamedKey
from midfill.fim import parse_starcoder_prompt
from midfill.serve_args import RELOADABLE, ServeArgs
from serving.auth import KeyStore, key_from_headers
from serving.engine import Engine
from serving.lineage import from_folder, from_version
from serving.loading import locate
from serving.metrics import Metrics
from serving.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    CompletionRequest,
    completion_body,
    completion_id,
    error_body,
    models_body,
    parse_body,
    usage,
    usage_chunk,
    validation_error,
)
from serving.requests import PromptTooLong, SamplingParams
from serving.settings import ServingSettings
from serving.usage import KeyUsage

log = logging.getLogger("ray.serve")

# The warm-up completion every replica runs before it is ready (a few tokens: proof, not a benchmark).
WARMUP_PREFIX, WARMUP_SUFFIX, WARMUP_TOKENS = "def add(a, b):\n    ", "\n    return result\n", 4


api = FastAPI(title="midfill infill endpoint", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in err["loc"]) or None
    return JSONResponse(
        error_body(f"{param}: {err['msg']}", type_="invalid_request_error", param=param), status_code=422
    )


@api.exception_handler(404)
async def _not_found(request: Request, _exc) -> JSONResponse:
    return JSONResponse(
        error_body(f"no route {request.method} {request.url.path}", type_="invalid_request_error", code="not_found"),
        status_code=404,
    )


@api.exception_handler(405)
async def _bad_method(request: Request, _exc) -> JSONResponse:
    return JSONResponse(
        error_body(f"{request.method} is not allowed on {request.url.path}", type_="invalid_request_error"),
        status_code=405,
    )


async def _read_body(request: Request) -> bytes:
    """The body, read no further than one byte past the limit (parse_body answers 413 for that)."""
    if request.headers.get("content-length", "").isdigit() and int(request.headers["content-length"]) > MAX_BODY_BYTES:
        raise ApiError(
            413, f"request body is over {MAX_BODY_BYTES} bytes; send a shorter prompt", code="body_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            break
    return b"".join(chunks)


async def _given(body: bytes) -> bytes:
    return body


def _sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class InfillReplica:
    """A replica: one loaded model behind the OpenAI completions API."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self.settings = ServingSettings()
        self.created = int(time.time())
        self.replica_id = uuid.uuid4().hex[:12]  # /health names it: tells a reconfigure from a replacement
        self.keys = KeyStore(
            keys_file=self.args.api_keys_file, keys_env=self.args.api_keys_env, disabled=self.args.auth_disabled
        )
        self.max_new_tokens = self.args.max_new_tokens
        self.max_batch_size = self.args.max_batch_size
        self.max_queued_requests = self.args.max_queued_requests
        self.inflight = 0
        self._settings_lock = threading.Lock()  # reconfigure() vs a request reading the limits
        self.engine: Engine | None = None
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else {"running": 0, "waiting": 0})
        folder, default_name, version = locate(
            self.args.model_uri,
            tracking_uri=self.args.tracking_uri or self.settings.resolved_tracking_uri(),
            cache_dir=self.settings.model_cache(),
        )
        self.model_name = self.args.served_model_name or default_name
        self.lineage = from_version(version) if version else from_folder(folder, default_name)
        self.usage = KeyUsage(self.metrics.registry, self.lineage.tag)
        self.engine = self._load(folder)  # raises: Ray marks the replica failed, never routes to it
        self.warmup_seconds = self._warm_up(self.engine)

    def _load(self, folder) -> Engine:
        import torch

        torch.set_num_threads(self.settings.serve_torch_threads or max(1, int(self.args.num_cpus)))
        device, dtype = self.settings.device_and_dtype()
        try:
            engine = Engine.from_export(
                folder,
                dtype=dtype,
                device=device,
                max_batch_size=self.max_batch_size,
                max_prefill_tokens=self.args.max_prefill_tokens,
                prefix_cache_tokens=self.args.prefix_cache_tokens,
                max_context=self.args.max_context_tokens,
                fim_format=self.args.fim_format,
                decode_path=self.settings.serve_decode_path,
                tracking_uri=self.args.tracking_uri
                or self.settings.resolved_tracking_uri(),  # a composed model's parents
                cache_dir=self.settings.model_cache(),
            )
        except Exception as exc:
            raise RuntimeError(f"loading {self.lineage.tag} from {folder} failed: {type(exc).__name__}: {exc}") from exc
        self._apply_reloadable(engine, self.args)
        log.info("midfill: loaded %s from %s", self.lineage.tag, folder)
        return engine

    def _warm_up(self, engine: Engine) -> float:
        """One real infill through the engine thread: proves the weights produce tokens (and pays
        first-call costs) before Ray sends traffic here. A failure fails the replica."""
        start = time.monotonic()
        try:
            engine.infill(WARMUP_PREFIX, WARMUP_SUFFIX, SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0))
        except Exception as exc:
            engine.close()
            raise RuntimeError(f"warm-up completion of {self.lineage.tag} failed: {type(exc).__name__}: {exc}") from exc
        return time.monotonic() - start

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply settings that need no reload (limits, keys); unknown keys are an error, not ignored."""
        unknown = set(config) - set(RELOADABLE)
        if unknown:
            raise ValueError(f"user_config: unknown keys {sorted(unknown)}; reloadable are {list(RELOADABLE)}")
        merged = ServeArgs.model_validate({**self.args.model_dump(), **config})
        keys = KeyStore(keys_file=merged.api_keys_file, keys_env=merged.api_keys_env, disabled=merged.auth_disabled)
        with self._settings_lock:
            self.keys = keys
            self.max_new_tokens, self.max_queued_requests = merged.max_new_tokens, merged.max_queued_requests
            self.max_batch_size = merged.max_batch_size
            if self.engine is not None:  # None only if Ray calls this before the constructor returned
                self._apply_reloadable(self.engine, merged)
            self.args = merged

    @staticmethod
    def _apply_reloadable(engine: Engine, args: ServeArgs) -> None:
        engine.max_batch_size = args.max_batch_size
        engine.max_prefill_tokens = args.max_prefill_tokens
        engine.prefix_cache.max_tokens = args.prefix_cache_tokens  # shrinks on the next store

    def check_health(self) -> None:
        """Ray Serve's probe (only after the constructor loaded and warmed up): a dead engine is replaced."""
        if self.engine is not None and not self.engine.alive:
            raise RuntimeError("engine thread is not running")

    def __del__(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # -- helpers ----------------------------------------------------------------------------------------
    def _authorize(self, headers) -> NamedKey:
        key = self.keys.identify(key_from_headers(headers))
        if key is None:
            missing = key_from_headers(headers) is None
            raise ApiError(
                401,
                "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
                if missing
                else "invalid API key",
                code="missing_api_key" if missing else "invalid_api_key",
            )
        return key

    async def _ready_engine(self) -> Engine:
        if self.engine is None or not self.engine.alive:  # Ray replaces the replica (check_health)
            raise ApiError(503, "engine stopped; retry shortly", code="engine_stopped", headers={"Retry-After": "5"})
        return self.engine

    def _parse(self, body: bytes) -> CompletionRequest:
        data = parse_body(body)
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        req.check_supported()
        if req.model is not None and req.model != self.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} does not exist; this endpoint serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return req

    def _prompt(self, engine: Engine, req: CompletionRequest) -> tuple[list[int], str]:
        """Token ids and the mode: suffix (we template), raw-fim (StarCoder sentinels translated), raw."""
        text = req.prompt_text()
        if req.suffix is not None:
            return engine.encode(engine.infill_prompt(text, req.suffix)), "suffix"
        parsed = parse_starcoder_prompt(text)
        if parsed is not None:
            return engine.encode(engine.infill_prompt(*parsed)), "raw-fim"
        ids = engine.encode(text)
        if not ids:
            raise ApiError(
                400, "prompt: empty; send some text (or a suffix for an infill)", param="prompt", code="invalid_value"
            )
        return ids, "raw"

    def _params(self, engine: Engine, req: CompletionRequest, prompt_tokens: int) -> SamplingParams:
        if req.max_tokens is not None and req.max_tokens > self.max_new_tokens:
            raise ApiError(
                400,
                f"max_tokens: {req.max_tokens} is above this server's limit of {self.max_new_tokens}",
                param="max_tokens",
                code="invalid_value",
            )
        room = engine.max_context - prompt_tokens
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.max_new_tokens, room)
        try:
            engine.check_length(prompt_tokens, max(max_tokens, 1))
        except PromptTooLong as exc:
            if exc.prompt_alone_too_long:
                raise ApiError(413, str(exc), param="prompt", code="context_length_exceeded") from None
            raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_strings(), seed=req.seed
        )

    def _admit(self) -> None:
        limit = self.args.max_ongoing_requests + self.max_queued_requests
        if self.max_queued_requests >= 0 and self.inflight >= limit:
            raise ApiError(
                429,
                f"server is at capacity ({limit} requests in flight); retry shortly",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )

    def _effective_limits(self) -> dict[str, int]:
        """What the engine runs with now (after reconfigure), as /health reports it."""
        return {
            "max_batch_size": self.engine.max_batch_size,
            "max_prefill_tokens": self.engine.max_prefill_tokens,
            "prefix_cache_tokens": self.engine.prefix_cache.max_tokens,
            "max_new_tokens": self.max_new_tokens,
            "max_context_tokens": self.engine.max_context,
        }

    # -- routes -----------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> JSONResponse:
        """What this replica serves: the registry version (name + version), and whether it is ready
        (loaded and warmed up, which every answering replica is, and its engine still running)."""
        code, body = self.health_info()
        return JSONResponse(body, status_code=code)

    def health_info(self) -> tuple[int, dict[str, Any]]:
        """/health's status code and body (also called through a handle by the canary router)."""
        served = {"registered_model": self.lineage.registered_model, "version": self.lineage.version}
        if self.engine is None or not self.engine.alive:
            return 503, {"status": "engine stopped", "ready": False, **served}
        return 200, {
            "status": "ok",
            "ready": True,
            **served,
            "model": self.model_name,
            "source": self.args.model_uri,
            "warmup_seconds": round(self.warmup_seconds, 3),
            "started": self.created,
            "replica": self.replica_id,
            **self.engine.stats(),
            "decode_steps": self.engine.steps,
            "limits": self._effective_limits(),
            "decode_path": self.engine.decode_path,
        }

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        code, body = await self.models_info(request.headers)
        return JSONResponse(body, status_code=code, headers=self.lineage.headers())

    async def models_info(self, headers) -> tuple[int, dict[str, Any]]:
        """/v1/models' status code and body (also called through a handle by the canary router)."""
        try:
            self._authorize(headers)
            engine = await self._ready_engine()
        except ApiError as exc:
            return exc.status, exc.body()
        body = models_body(name=self.model_name, max_model_len=engine.max_context, created=self.created)
        body["data"][0].update(version=self.lineage.version, lineage=self.lineage.as_dict())
        return 200, body

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._answer(request.headers, _read_body(request), time.monotonic())

    async def forward(self, headers: dict[str, str], body: bytes):
        """/v1/completions for the canary router (serving.canary), through a streaming handle: the
        response's status and headers (a dict), its body (bytes or SSE text chunks), then
        {"report": ...}: how the request ended (status, finish_reason, completion_tokens)."""
        report: dict[str, Any] = {}
        try:
            response = await self._answer(headers, _given(body), time.monotonic(), report)
        except ApiError as exc:
            report["status"] = exc.status
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        yield {"status": response.status_code, "headers": dict(response.headers), "media_type": response.media_type}
        if isinstance(response, StreamingResponse):
            async for chunk in response.body_iterator:
                yield chunk
        else:
            yield bytes(response.body)
        yield {"report": report}

    async def _answer(self, headers, body, start: float, report: dict[str, Any] | None = None) -> Response:
        """A completion for the request `headers` + `body` (an awaitable of its bytes)."""
        mode, key = "-", None
        try:
            key = self._authorize(headers)
            req = self._parse(await body)
            self.usage.admit(key)
            self._admit()
            engine = await self._ready_engine()
            ids, mode = self._prompt(engine, req)
            params = self._params(engine, req, len(ids))
        except ApiError as exc:
            self.metrics.requests.labels(status=str(exc.status), mode=mode).inc()
            self.usage.refused(key, exc.status)
            raise
        self.metrics.prompt_tokens.inc(len(ids))
        self.inflight += 1
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse(engine, ids, params, include_usage, start, mode, key, report),
                media_type="text/event-stream",
                headers=self.lineage.headers(),
            )
        try:
            return JSONResponse(
                await self._complete(engine, ids, params, start, mode, key, report), headers=self.lineage.headers()
            )
        finally:
            self.inflight -= 1

    async def _complete(self, engine: Engine, ids, params, start: float, mode: str, key: NamedKey, report=None) -> dict:
        result = await engine.complete(ids, params)  # one wake-up per request, not one per token
        self._count(result, start, mode, key, stream="false", report=report)
        if result.finish_reason == "error":
            raise ApiError(500, result.error or "generation failed", code="generation_failed")
        return self.lineage.stamp(
            completion_body(
                id_=completion_id(),
                model=self.model_name,
                text=result.text,
                finish_reason=result.finish_reason,
                usage_=usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
            )
        )

    async def _sse(
        self, engine: Engine, ids, params, include_usage: bool, start: float, mode: str, key: NamedKey, report=None
    ):
        id_, created, last = completion_id(), int(time.time()), None
        try:
            async for out in engine.stream(ids, params):
                last = out
                if out.finished and out.finish_reason == "error":
                    yield _sse_event(
                        error_body(out.error or "generation failed", type_="server_error", code="generation_failed")
                    )
                    break
                if out.text or out.finished:
                    yield _sse_event(
                        self.lineage.stamp(
                            completion_body(
                                id_=id_,
                                model=self.model_name,
                                text=out.text,
                                finish_reason=out.finish_reason if out.finished else None,
                                usage_=None,
                                created=created,
                            )
                        )
                    )
            if include_usage and last is not None:
                yield _sse_event(
                    self.lineage.stamp(
                        usage_chunk(
                            id_=id_,
                            model=self.model_name,
                            created=created,
                            usage_=usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
                        )
                    )
                )
            yield "data: [DONE]\n\n"
        finally:
            # Runs on normal end and when the client disconnects (the generator is closed, which
            # closes engine.stream and cancels the request there).
            self.inflight -= 1
            finished = last is not None and last.finished
            self._count(last, start, mode, key, stream="true", finished=finished, report=report)

    def _count(
        self, last, start: float, mode: str, key: NamedKey, *, stream: str, finished: bool = True, report=None
    ) -> None:
        """last: the request's Completion, or its last StepOutput (None, or not `finished`, when the
        client left first: then it counts as cancelled, with the tokens generated until then).
        `report` (the canary router's request) gets how it ended."""
        reason = last.finish_reason if last is not None and finished else "cancelled"
        status = {"error": "500", "cancelled": "499"}.get(reason, "200")
        if report is not None:
            report.update(
                status=int(status), finish_reason=reason, completion_tokens=last.completion_tokens if last else 0
            )
        self.metrics.requests.labels(status=status, mode=mode).inc()
        self.metrics.latency.labels(stream=stream).observe(time.monotonic() - start)
        if last is not None:
            self.metrics.generated_tokens.inc(last.completion_tokens)
            self.metrics.cached_prompt_tokens.inc(last.cached_tokens)
        self.usage.record(
            key,
            status=status,
            prompt=last.prompt_tokens if last else 0,
            completion=last.completion_tokens if last else 0,
            cached=last.cached_tokens if last else 0,
        )


@serve.deployment(name="InfillServer")
@serve.ingress(api)
class InfillServer(InfillReplica):
    """The replica with its own HTTP routes: the application's ingress (strategy InPlace, `midfill serve`)."""


# The same replica behind the canary router (serving.canary), called through handles: Ray Serve
# allows one FastAPI ingress per application, and there the router is it.
InfillModel = serve.deployment(name="InfillServer")(InfillReplica)
