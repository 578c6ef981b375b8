from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serving.protocol import ApiError, CompletionRequest, parse_body, validation_error


def test_unknown_fields_are_ignored_and_stop_normalised():
    req = CompletionRequest.model_validate({"prompt": "x", "stop": "\n", "frobnicate": True})
    assert req.stop_strings() == ("\n",) and req.temperature == 1.0


@pytest.mark.parametrize(
    ("field", "value"), [("n", 2), ("echo", True), ("logprobs", 1), ("best_of", 3), ("presence_penalty", 0.5)]
)
def test_unsupported_options_are_a_400_naming_them(field, value):
    with pytest.raises(ApiError) as exc:
        CompletionRequest.model_validate({"prompt": "x", field: value}).check_supported()
    assert exc.value.status == 400 and exc.value.param == field


def test_validation_errors_are_422_with_the_field():
    with pytest.raises(ValidationError) as exc:
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": -1})
    err = validation_error(exc.value)
    assert err.status == 422 and err.param == "max_tokens"
    assert err.body()["error"].keys() == {"message", "type", "param", "code"}


def test_batch_prompts_are_rejected():
    with pytest.raises(ApiError, match="one string"):
        CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompt_text()
    assert CompletionRequest.model_validate({"prompt": ["a"]}).prompt_text() == "a"


@pytest.mark.parametrize(
    ("raw", "status", "param", "code"),
    [
        (b'{"prompt": "a\\ud800"}', 400, "prompt", "invalid_unicode"),
        (b'{"prompt": "a", "prompt": "b"}', 400, "prompt", "duplicate_key"),
        (b'{"prompt": "a", "temperature": NaN}', 400, None, "invalid_json"),
        (b'{"prompt": "a", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, None, "invalid_json"),
        (b'{"prompt": "a", "x": ' + b"[" * 33 + b"]" * 33 + b"}", 400, "x", "invalid_json"),
        (b'{"max_tokens": ' + b"1" * 5000 + b"}", 400, None, "invalid_json"),
        (b"\xff\xfe\x00", 400, None, "invalid_json"),
        (b"x" * (4 * 1024 * 1024 + 1), 413, None, "body_too_large"),
    ],
)
def test_parse_body_answers_malformed_bodies_with_a_4xx(raw, status, param, code):
    with pytest.raises(ApiError) as exc:
        parse_body(raw)
    assert (exc.value.status, exc.value.param, exc.value.code) == (status, param, code)
    json.dumps(exc.value.body(), ensure_ascii=False).encode("utf-8")  # the answer itself is valid UTF-8


def test_parse_body_keeps_a_good_body_and_nesting_up_to_the_limit():
    raw = b'{"prompt": "a\\u00e9\\ud83d\\ude00", "x": ' + b"[" * 31 + b"]" * 31 + b"}"
    assert parse_body(raw)["prompt"] == "a\u00e9\U0001f600"


def test_token_id_prompts_are_a_422_that_says_so():
    for prompt in ([1, 2], [[1], [2]]):
        with pytest.raises(ApiError, match="token-id prompts are not supported") as exc:
            CompletionRequest.model_validate({"prompt": prompt})
        assert exc.value.status == 422 and exc.value.param == "prompt"
