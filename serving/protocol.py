"""The OpenAI completions wire format, as much of it as an infill server honours.

Requests are parsed once here; unknown fields are ignored (clients send many), known fields we
cannot honour are rejected with a 400 that names them rather than silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 32  # editors (Continue, llm-ls) send many; OpenAI's own limit of 4 would break them
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_NESTING = 32  # no field we read nests deeper than 3; this only bounds what we walk in unknown ones
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


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
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(
            self.message, type_=self.TYPES.get(self.status, "invalid_request_error"), param=self.param, code=self.code
        )


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx naming what is wrong with it.

    Stricter than json.loads on purpose: NaN/Infinity are not JSON, a repeated key would make the
    request mean whatever the last copy says, and a lone UTF-16 surrogate ("\\ud800") decodes to a
    str that no tokenizer or UTF-8 encoder accepts.
    """
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(
            413, f"request body is over {MAX_BODY_BYTES} bytes; send a shorter prompt", code="body_too_large"
        )
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except ApiError:
        raise
    except RecursionError:
        raise ApiError(400, f"request body nests deeper than {MAX_NESTING} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8, an int of > 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    for key, value in data.items():
        _check_value(key, value, 1)
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ApiError(
                400,
                f"{_printable(key)}: the key appears twice in one object; send it once",
                param=_printable(key),
                code="duplicate_key",
            )
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ApiError(
        400, f"request body is not valid JSON: {name} is not a JSON number; send a finite number", code="invalid_json"
    )


def _check_value(param: str, value: Any, depth: int) -> None:
    """Reject lone surrogates anywhere and nesting past MAX_NESTING (walked iteratively: no recursion)."""
    stack = [(value, depth)]
    while stack:
        item, level = stack.pop()
        if level > MAX_NESTING:
            raise ApiError(
                400,
                f"{_printable(param)}: nests deeper than {MAX_NESTING} levels",
                param=_printable(param),
                code="invalid_json",
            )
        if isinstance(item, str):
            _check_text(param, item)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_text(param, k)
                stack.append((v, level + 1))
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)


def _check_text(param: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400,
            f"{_printable(param)}: contains a lone UTF-16 surrogate (like \\ud800), which is not text; send "
            "valid Unicode",
            param=_printable(param),
            code="invalid_unicode",
        ) from None


def _printable(text: str) -> str:
    """A field name safe to echo back (a name can itself hold a surrogate)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
    max_tokens: int | None = Field(
        default=None, ge=1, description="Tokens to generate (default: the server's max_new_tokens, within the context)."
    )
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(x, str) for x in v):
            raise ApiError(
                422,
                "prompt: token-id prompts are not supported; send the prompt as text",
                param="prompt",
                code="unsupported_value",
            )
        return v

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
            raise ApiError(
                400,
                f"prompt: give one string (got a list of {len(self.prompt)}); batch prompts are not supported",
                param="prompt",
            )
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
    """A 422 naming the top-level field; the message gives each way the value failed (a field that
    takes a string or a list, like `stop`, fails once per accepted type)."""
    errors = exc.errors()
    param = str(errors[0]["loc"][0]) if errors[0]["loc"] else None
    same = [e for e in errors if e["loc"] and str(e["loc"][0]) == param] or errors[:1]
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in same[:3])
    return ApiError(422, details if param else errors[0]["msg"], param=param, code="invalid_value")


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
    *,
    id_: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage_: dict[str, int] | None,
    created: int | None = None,
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
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "midfill", "max_model_len": max_model_len}
        ],
    }


FinishReason = Literal["stop", "length"]
