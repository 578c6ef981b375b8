"""The replicas' /health as the operator reads it through KubeRay's serve Service, played over real
HTTP by the tests (as they play KubeRay by writing RayService status): a local server answering
GET /<namespace>/<service><route_prefix>/health with what each test says the replicas serve."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class ServeEndpoints:
    """What each (namespace, service) answers; none set = the Service has no ready endpoint (503)."""

    def __init__(self) -> None:
        self.reports: dict[tuple[str, str], dict] = {}
        self.hits = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url_template = (
            f"http://127.0.0.1:{self.server.server_port}/{{namespace}}/{{service}}{{route_prefix}}/health"
        )

    def serve(self, namespace: str, service: str, model: str, version: str) -> None:
        """The replicas behind `service` serve `model` `version`, loaded and warmed up."""
        self.reports[(namespace, service)] = {
            "status": "ok",
            "ready": True,
            "registered_model": model,
            "version": version,
        }

    def down(self, namespace: str, service: str) -> None:
        self.reports.pop((namespace, service), None)

    @contextlib.contextmanager
    def running(self) -> Iterator[ServeEndpoints]:
        """Answer requests on a thread for the duration."""
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoints = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                endpoints.hits += 1
                parts = self.path.strip("/").split("/")
                report = endpoints.reports.get((parts[0], parts[1])) if len(parts) >= 3 else None
                body = json.dumps(report or {"detail": "no ready endpoint"}).encode()
                self.send_response(200 if report else 503)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass

        return Handler


@pytest.fixture
def serve_endpoint() -> Iterator[ServeEndpoints]:
    with ServeEndpoints().running() as endpoints:
        yield endpoints
