"""The OpenAI completions wire format, as much of it as an infill server honours.

Requests are parsed once here; unknown fields are ignored (clients send many), known fields we
cannot honour are rejected with a 400 that names them rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 32  # editors (Continue, llm-ls) send many; OpenAI's own limit of 4 would break them


class ApiError(Exception):
    """An error answered in OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "service_unavailable",
    }

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.TYPES.get(self.status, "invalid_request_error"), param=self.param, code=self.code)


def error_body(message: str, *, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. With `suffix` the server applies the model's FIM template; without it the
    prompt is used as sent (StarCoder sentinels translated to the model's own format)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    model: str | None = Field(default=None, description="Must name the served model when given.")
    prompt: str | list[str] = Field(description="The code before the cursor (or a fully templated prompt).")
    suffix: str | None = Field(default=None, description="The code after the cursor: switches on infill mode.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate (default: the server's max_new_tokens, within the context).")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"prompt: give one string (got a list of {len(self.prompt)}); batch prompts are not supported", param="prompt")
        return self.prompt[0]

    def check_supported(self) -> None:
        """400 for known options this server does not implement (never silently ignored)."""
        if self.n != 1:
            raise ApiError(400, "n: only n=1 is supported; send parallel requests instead", param="n")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of: not supported; leave it unset", param="best_of")
        if self.echo:
            raise ApiError(400, "echo: not supported; leave it false", param="echo")
        if self.logprobs is not None:
            raise ApiError(400, "logprobs: not supported; leave it unset", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name}: not supported; leave it 0", param=name)


def validation_error(exc: ValidationError) -> ApiError:
    """The first pydantic error as a 422 naming the field."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return ApiError(422, f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value")


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens counts prompt tokens whose work was
    reused from an earlier request (serving.prefix_cache), as OpenAI and vLLM report it."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    *, id_: str, model: str, text: str, finish_reason: str | None, usage_: dict[str, int] | None, created: int | None = None
) -> dict[str, Any]:
    """A full response, or one streamed chunk (usage_ None)."""
    body: dict[str, Any] = {
        "id": id_,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage_chunk(*, id_: str, model: str, created: int, usage_: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream when stream_options.include_usage is set: no choices, only usage."""
    return {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage_}


def models_body(*, name: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "midfill", "max_model_len": max_model_len}],
    }


FinishReason = Literal["stop", "length"]
