"""Who used the endpoint: per-key counters in /metrics, and per-key limits (429 + Retry-After).

Counters are labelled by key *name* (midfill.apikeys) and the served model version, never by a key
or its digest. Limits (`rpm`, `tpm` on a key's line) hold per replica over a sliding minute: with N
replicas a key gets up to N times its limit in total (docs/serving.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque

from prometheus_client import CollectorRegistry, Counter

from midfill.apikeys import NamedKey
from serving.protocol import ApiError

WINDOW_S = 60.0


class KeyUsage:
    """Per-key Prometheus counters (in the replica's registry) and sliding-minute limits."""

    def __init__(self, registry: CollectorRegistry, model_version: str) -> None:
        labels = ["key", "model_version"]
        self.model_version = model_version
        self.requests = Counter(
            "midfill_key_requests",
            "Completion requests by key name, model version and HTTP status.",
            [*labels, "status"],
            registry=registry,
        )
        self.prompt = Counter(
            "midfill_key_prompt_tokens", "Prompt tokens by key name and model version.", labels, registry=registry
        )
        self.completion = Counter(
            "midfill_key_completion_tokens",
            "Completion tokens by key name and model version.",
            labels,
            registry=registry,
        )
        self.cached = Counter(
            "midfill_key_cached_tokens",
            "Prompt tokens served from the prefix cache, by key name and model version.",
            labels,
            registry=registry,
        )
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = defaultdict(deque)
        self._tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    # -- limits -------------------------------------------------------------------------------------
    def admit(self, key: NamedKey) -> None:
        """Count one request against `key`'s limits, or raise a 429 saying when to retry."""
        if key.rpm is None and key.tpm is None:
            return
        now = time.monotonic()
        with self._lock:
            reqs, toks = self._requests[key.name], self._tokens[key.name]
            while reqs and reqs[0] <= now - WINDOW_S:
                reqs.popleft()
            while toks and toks[0][0] <= now - WINDOW_S:
                toks.popleft()
            if key.rpm is not None and len(reqs) >= key.rpm:
                self._refuse(key, f"{key.rpm} requests per minute", reqs[0] + WINDOW_S - now)
            used = sum(n for _, n in toks)
            if key.tpm is not None and used >= key.tpm:
                self._refuse(key, f"{key.tpm} tokens per minute", toks[0][0] + WINDOW_S - now)
            reqs.append(now)

    @staticmethod
    def _refuse(key: NamedKey, what: str, wait_s: float) -> None:
        retry = max(1, math.ceil(wait_s))
        raise ApiError(
            429,
            f"API key {key.name!r} is over its limit of {what}; retry in {retry} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )

    # -- counting -----------------------------------------------------------------------------------
    def refused(self, key: NamedKey | None, status: int) -> None:
        """A request of a known key answered with an error before generation."""
        if key is not None:
            self.requests.labels(key=key.name, model_version=self.model_version, status=str(status)).inc()

    def record(self, key: NamedKey, *, status: str, prompt: int, completion: int, cached: int) -> None:
        """A request that reached the engine: the tokens it used (what its `usage` field said)."""
        labels = {"key": key.name, "model_version": self.model_version}
        self.requests.labels(**labels, status=status).inc()
        self.prompt.labels(**labels).inc(prompt)
        self.completion.labels(**labels).inc(completion)
        self.cached.labels(**labels).inc(cached)
        if key.tpm is not None:
            with self._lock:
                self._tokens[key.name].append((time.monotonic(), prompt + completion))
