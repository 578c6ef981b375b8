"""Malformed bodies against the real endpoint (local Ray Serve): always an OpenAI-shaped 4xx, never a 5xx.

Named cases cover each input class once; a property-based test (hypothesis) then throws generated
bodies at the same server. bench/fuzz_serve.py does the long run (>= 1,000 requests) on `midfill serve`.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray_helpers import local_serve

from serving.app import build_app
from serving.protocol import MAX_BODY_BYTES, CompletionRequest

PREFIX = "def mean(values):\n    total = 0\n"
SUFFIX = "\n    return total\n"
OK = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MIDFILL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    args = {"model_uri": str(tiny_export), "served_model_name": "tiny", "auth_disabled": True, "max_new_tokens": 8}
    try:
        with local_serve(build_app(args)) as url:
            yield url
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def post(http: httpx.Client, raw: bytes) -> httpx.Response:
    return http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})


def assert_answered(r: httpx.Response) -> None:
    """Below 500, and an error is OpenAI's shape; a 200 stream ends with [DONE]."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", r.text[-300:]
    else:
        assert r.json()["object"] == "text_completion"


def _nested(depth: int) -> str:
    return '{"prompt": "x", "extra": ' + "[" * depth + "]" * depth + "}"


# (raw body, status, param, words the message must hold)
CASES = {
    "bad_utf8": (b'{"prompt": "\xff\xfe x"}', 400, None, "not valid JSON"),
    "surrogate_prompt": (b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400, "prompt", "surrogate"),
    "surrogate_suffix_stream": (b'{"prompt": "a", "suffix": "\\udfff", "stream": true}', 400, "suffix", "surrogate"),
    "surrogate_stop": (b'{"prompt": "a", "stop": ["ok", "\\ud83d"]}', 400, "stop", "surrogate"),
    "surrogate_in_unknown_key": (b'{"prompt": "a", "x": {"\\ud800": 1}}', 400, "x", "surrogate"),
    "deep_nesting": (_nested(100_000).encode(), 400, None, "nests deeper"),
    "nesting_past_limit": (_nested(40).encode(), 400, "extra", "nests deeper"),
    "duplicate_key": (b'{"prompt": "a", "max_tokens": 1, "max_tokens": 900}', 400, "max_tokens", "twice"),
    "nan": (b'{"prompt": "a", "temperature": NaN}', 400, None, "NaN"),
    "infinity": (b'{"prompt": "a", "top_p": -Infinity}', 400, None, "Infinity"),
    "int_of_5000_digits": (b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "not valid JSON"),
    "huge_max_tokens": (b'{"prompt": "a", "max_tokens": ' + b"9" * 40 + b"}", 400, "max_tokens", "limit"),
    "huge_seed": (b'{"prompt": "a", "temperature": 1, "seed": ' + str(2**70).encode() + b"}", 422, "seed", "less than"),
    "token_prompt": (b'{"prompt": [1, 2, 3]}', 422, "prompt", "token-id prompts are not supported"),
    "token_batch_prompt": (b'{"prompt": [[1, 2], [3]]}', 422, "prompt", "token-id prompts are not supported"),
    "wrong_type_stop": (b'{"prompt": "a", "stop": [1]}', 422, "stop", "string"),
    "wrong_type_stream_options": (
        b'{"prompt": "a", "stream": true, "stream_options": "yes"}',
        422,
        "stream_options",
        "dictionary",
    ),
    "temperature_out_of_range": (b'{"prompt": "a", "temperature": 2.5}', 422, "temperature", "less than"),
    "top_p_zero": (b'{"prompt": "a", "top_p": 0}', 422, "top_p", "greater than"),
    "not_an_object": (b'["prompt"]', 400, None, "JSON object"),
    "empty_body": (b"", 400, None, "not valid JSON"),
    "empty_prompt": (b'{"prompt": ""}', 400, "prompt", "empty"),
    "missing_prompt": (b'{"max_tokens": 2}', 422, "prompt", "required"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_malformed_input_class_gets_a_4xx_naming_the_problem(http, case):
    raw, status, param, words = CASES[case]
    r = post(http, raw)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert_answered(r)


def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(http):
    r = post(http, json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    ok = post(http, json.dumps(OK).encode())
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


# -- generated bodies -----------------------------------------------------------------------------------
# Text with every code point, lone surrogates included (JSON carries them as \ud800 escapes).
ANY_TEXT = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | ANY_TEXT
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3), max_leaves=8
)
# Every field the API declares, and "user", which OpenAI clients send and we accept and ignore.
FIELDS = [*CompletionRequest.model_fields, "user"]
# Mostly plausible values, so that bodies get past the first check and reach the engine.
PLAUSIBLE = {
    "prompt": ANY_TEXT | st.lists(ANY_TEXT, max_size=2) | st.lists(st.integers(-5, 5000), max_size=3),
    "suffix": ANY_TEXT | st.none(),
    "max_tokens": st.integers(-2, 10),
    "temperature": st.floats(-0.5, 2.5),
    "top_p": st.floats(-0.1, 1.1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": ANY_TEXT | st.lists(ANY_TEXT, max_size=4),
    "seed": st.integers(-(2**65), 2**65),
}
BODIES = st.fixed_dictionaries(
    {"prompt": PLAUSIBLE["prompt"] | JSON_VALUES},
    optional={name: PLAUSIBLE.get(name, JSON_VALUES) | JSON_VALUES for name in FIELDS if name != "prompt"}
    | {"junk": JSON_VALUES},
)


@st.composite
def raw_bodies(draw) -> bytes:
    """A generated body, serialised as a client would (NaN as NaN), sometimes damaged afterwards."""
    raw = json.dumps(draw(BODIES), allow_nan=True).encode()
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "byte", "duplicate"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "byte":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at:]
    elif damage == "duplicate":
        raw = b'{"prompt": "dup", ' + raw[1:]
    return raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=raw_bodies())
def test_generated_bodies_never_get_a_5xx(http, raw):
    assert_answered(post(http, raw))


def test_the_server_is_healthy_after_the_fuzzing(http):
    assert http.get("/health").json()["status"] == "ok"
    assert post(http, json.dumps(OK).encode()).status_code == 200
