"""Per-key limits over a sliding minute (the endpoint-level checks are in test_usage_lineage.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from midfill.apikeys import NamedKey, digest
from serving import usage as usage_mod
from serving.protocol import ApiError
from serving.usage import KeyUsage


def test_tokens_per_minute_refuses_until_the_window_frees(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(usage_mod.time, "monotonic", lambda: now[0])
    registry = CollectorRegistry()
    u = KeyUsage(registry, "m/1")
    heavy = NamedKey("heavy", digest("k1"), tpm=100)
    light = NamedKey("light", digest("k2"))
    u.admit(heavy)
    u.record(heavy, status="200", prompt=60, completion=50, cached=0)  # 110 >= 100: the next one waits
    now[0] += 20
    with pytest.raises(ApiError) as refused:
        u.admit(heavy)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "40"
    assert "'heavy'" in str(refused.value.body()) and "100 tokens per minute" in str(refused.value.body())
    u.admit(light)  # another key is not affected
    now[0] += 40.5
    u.admit(heavy)  # the minute has passed
    text = generate_latest(registry).decode()
    assert 'midfill_key_prompt_tokens_total{key="heavy",model_version="m/1"} 60.0' in text
    assert digest("k1") not in text and "k1" not in text
