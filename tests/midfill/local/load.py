"""Client load for the local release tests: threads posting completions back to back while a
release swaps, rolls back or walks its canary steps; every answer (status, served version, user)
and every transport error is kept for the test to judge."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx

BODY = {"prompt": "def add(a, b):\n    ", "suffix": "\n    return c\n", "max_tokens": 4, "temperature": 0}


@dataclass(frozen=True)
class Answer:
    started: float  # time.monotonic() when the request was sent
    status: int
    version: str | None  # the x-midfill-model-version header: which version answered
    user: str | None


class Load:
    """`clients` threads; with `users_per_client`, each thread cycles through its own editors'
    `user` fields (sticky canary routing is judged per user)."""

    def __init__(self, url: str, clients: int = 3, *, users_per_client: int = 0) -> None:
        self.url, self.stop = url, threading.Event()
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._loop, args=([f"ed-{t}-{u}" for u in range(users_per_client)],), daemon=True)
            for t in range(clients)
        ]

    def _loop(self, users: list[str]) -> None:
        with httpx.Client(timeout=120) as client:
            i = 0
            while not self.stop.is_set():
                user = users[i % len(users)] if users else None
                i += 1
                started = time.monotonic()
                try:
                    response = client.post(
                        f"{self.url}/v1/completions", json={**BODY, **({"user": user} if user else {})}
                    )
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                version = response.headers.get("x-midfill-model-version")
                self.answers.append(Answer(started, response.status_code, version, user))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)
