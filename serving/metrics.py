"""Prometheus metrics of one replica (its own registry: several replicas may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Prometheus metrics of one replica (its own registry: several replicas may share a process in tests)."""

    def __init__(self, engine_stats) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "midfill_requests",
            "Completion requests by HTTP status and mode.",
            ["status", "mode"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "midfill_request_latency_seconds",
            "End-to-end completion latency.",
            ["stream"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
        )
        self.prompt_tokens = Counter("midfill_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generated_tokens = Counter("midfill_generated_tokens", "Tokens generated.", registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "midfill_prompt_tokens_cached",
            "Prompt tokens whose keys/values were reused (prefix cache).",
            registry=self.registry,
        )
        Gauge("midfill_queue_depth", "Requests waiting for a batch slot.", registry=self.registry).set_function(
            lambda: engine_stats()["waiting"]
        )
        Gauge("midfill_running_requests", "Requests in the decode batch.", registry=self.registry).set_function(
            lambda: engine_stats()["running"]
        )
