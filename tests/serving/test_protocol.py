from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.protocol import ApiError, CompletionRequest, validation_error


def test_unknown_fields_are_ignored_and_stop_normalised():
    req = CompletionRequest.model_validate({"prompt": "x", "stop": "\n", "frobnicate": True})
    assert req.stop_strings() == ("\n",) and req.temperature == 1.0


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("echo", True), ("logprobs", 1), ("best_of", 3), ("presence_penalty", 0.5)])
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
