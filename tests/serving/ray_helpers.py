"""Start and stop a private local Ray + Serve for a test module or a benchmark (never join another)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager

import httpx

from midfill.serve_args import PROXY_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_serve(app, *, num_cpus: int = 2, health_timeout_s: float = 180):
    """Run `app` on a fresh local Ray in its own temp dir; yields the base URL."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="mfray", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    os.environ.update(PROXY_ENV)  # as `midfill serve` starts Ray: the proxy's replica-lost answers
    port = free_port()
    ray.init(
        _temp_dir=temp_dir,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        num_cpus=num_cpus,
        address="local",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="midfill", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + health_timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/health not ready after {health_timeout_s}s")
            time.sleep(0.3)
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
