"""Fuzz a real `midfill serve` with generated malformed completion requests; count the status classes.

One run serves the tiny test export (tests/serving/serving_exports.py) with `midfill serve --no-auth`
and sends --requests bodies (default 1,200) from a seeded generator, 8 at a time. Every body belongs
to an input class (lone surrogates, deep nesting, duplicate keys, NaN, huge ints, wrong types,
out-of-range values, token-id prompts, bad UTF-8, truncation, oversize, plausible-but-odd values).
A response >= 500, a dropped connection or a timeout is a failure; after the run /health must
still answer 200.

Baseline in the same run: with --baseline-ref REF (default main), the same requests first go to
REF's code (`git archive` into a temp dir, put first on PYTHONPATH of the server process).

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/fuzz_serve.py

JSON to bench/results/fuzz_serve.json; the table is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serving"))
from serving_exports import build_export  # noqa: E402

from serving.protocol import CompletionRequest  # noqa: E402

MIDFILL = str(Path(sys.executable).parent / "midfill")
MAX_BODY = 4 * 1024 * 1024
# Every field the API declares, and "user", which OpenAI clients send and we accept and ignore.
FIELDS = [*CompletionRequest.model_fields, "user"]
SURROGATES = ["\ud800", "\udfff", "\ud83d", "a\udc00b"]


def _text(rng: random.Random, n: int = 12) -> str:
    pool = "abc xyz\n\t{}()[]:=#'\"\\é漢😀\x00\x1f\u2028"
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, n)))


def _value(rng: random.Random, depth: int = 0):
    kind = rng.choice(
        ["none", "bool", "int", "bigint", "float", "text", "list", "dict"] if depth < 3 else ["int", "text", "none"]
    )
    return {
        "none": lambda: None,
        "bool": lambda: rng.random() < 0.5,
        "int": lambda: rng.randint(-5, 300),
        "bigint": lambda: rng.choice([2**63, 2**64, -(2**64), 10**30]),
        "float": lambda: rng.choice([0.0, -1.5, 0.7, 2.5, 1e308]),
        "text": lambda: _text(rng),
        "list": lambda: [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        "dict": lambda: {_text(rng, 5): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))},
    }[kind]()


def _base(rng: random.Random) -> dict:
    body = {
        "prompt": "def f(x):\n    " + _text(rng, 6),
        "max_tokens": rng.randint(1, 6),
        "temperature": rng.choice([0, 0.7]),
    }
    if rng.random() < 0.5:
        body["suffix"] = "\n    return x\n"
    if rng.random() < 0.3:
        body["stream"] = True
    return body


def _dump(body: dict) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def make_request(rng: random.Random, cls: str) -> bytes:
    body = _base(rng)
    field = rng.choice(FIELDS)
    if cls == "surrogate":
        where = rng.choice(["prompt", "suffix", "stop", "model", "user"])
        body[where] = rng.choice(SURROGATES) if where != "stop" else ["ok", rng.choice(SURROGATES)]
        return _dump(body)
    if cls == "deep_nesting":
        depth = rng.choice([40, 1_000, 100_000])
        return _dump(body)[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    if cls == "duplicate_key":
        return b'{"' + field.encode() + b'": ' + _dump({"v": _value(rng)})[6:-1] + b", " + _dump(body)[1:]
    if cls == "nan_inf":
        body[rng.choice(["temperature", "top_p", "max_tokens", "seed", "presence_penalty"])] = rng.choice(
            [float("nan"), float("inf"), -float("inf")]
        )
        return _dump(body)
    if cls == "huge_int":
        digits = rng.choice([25, 400, 5_000])
        return (
            _dump(body)[:-1]
            + f', "{rng.choice(["max_tokens", "seed", "n", "top_p"])}": '.encode()
            + b"9" * digits
            + b"}"
        )
    if cls == "wrong_type":
        body[field] = _value(rng)
        return _dump(body)
    if cls == "out_of_range":
        body[rng.choice(["max_tokens", "temperature", "top_p", "n", "seed", "best_of"])] = rng.choice(
            [-1, 0, 3, 10_000, 2**70, -(2**70)]
        )
        return _dump(body)
    if cls == "token_prompt":
        body["prompt"] = rng.choice([[1, 2, 3], [[1, 2], [3]], [], [""], ["a", "b"]])
        return _dump(body)
    if cls == "bad_utf8":
        raw = _dump(body)
        at = rng.randint(0, len(raw))
        return raw[:at] + bytes([rng.choice([0x80, 0xC0, 0xFF, 0xED])]) + raw[at:]
    if cls == "truncated":
        raw = _dump(body)
        return raw[: rng.randint(0, len(raw) - 1)]
    if cls == "oversize":
        body["prompt"] = "x" * (MAX_BODY + rng.randint(1, 1000))
        return _dump(body)
    if cls == "not_an_object":
        return _dump(_value(rng))[:200] if rng.random() < 0.5 else rng.choice([b"", b"null", b"[]", b"42", b'"x"'])
    # "plausible": odd but well-formed values of every field, several at once
    for name in rng.sample(FIELDS, rng.randint(1, 5)):
        body[name] = _value(rng)
    return _dump(body)


CLASSES = [
    "surrogate",
    "deep_nesting",
    "duplicate_key",
    "nan_inf",
    "huge_int",
    "wrong_type",
    "out_of_range",
    "token_prompt",
    "bad_utf8",
    "truncated",
    "oversize",
    "not_an_object",
    "plausible",
    "plausible",
    "plausible",
]


def requests_for(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        if cls == "oversize" and i % (3 * len(CLASSES)) != CLASSES.index("oversize"):
            cls = "plausible"  # 4 MiB bodies are costly: one in three rounds
        out.append((cls, make_request(rng, cls)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: Path, code_root: Path | None, state: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MIDFILL_STATE_DIR": str(state)}
    if code_root is not None:  # the baseline's serving/ and platform/ take precedence over the editable install
        env["PYTHONPATH"] = os.pathsep.join([str(code_root), str(code_root / "platform")])
    proc = subprocess.Popen(
        [MIDFILL, "serve", "--model", str(export), "--port", str(port), "--no-auth", "--name", "tiny"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("midfill serve exited before it was healthy")
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError("midfill serve not healthy after 240s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # its Ctrl-C path shuts Ray down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _openai_error(r: httpx.Response) -> bool:
    try:
        return set(r.json()["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return False


async def fire(url: str, reqs: list[tuple[str, bytes]], concurrency: int = 8) -> dict:
    by_class: dict[str, Counter] = {}
    failures: list[dict] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, cls: str, raw: bytes) -> None:
        async with sem:
            try:
                r = await client.post(
                    f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"}
                )
                status = f"{r.status_code // 100}xx"
                if r.status_code >= 500:
                    failures.append(
                        {
                            "class": cls,
                            "status": r.status_code,
                            "body": raw[:160].decode("utf-8", "backslashreplace"),
                            "answer": r.text[:200],
                        }
                    )
                elif r.status_code >= 400 and not _openai_error(r):
                    status = "4xx_not_openai_shaped"
                    failures.append(
                        {
                            "class": cls,
                            "status": r.status_code,
                            "body": raw[:160].decode("utf-8", "backslashreplace"),
                            "answer": r.text[:200],
                        }
                    )
            except httpx.HTTPError as exc:
                status = "no_answer"
                failures.append(
                    {"class": cls, "status": type(exc).__name__, "body": raw[:160].decode("utf-8", "backslashreplace")}
                )
            by_class.setdefault(cls, Counter())[status] += 1

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(one(client, cls, raw) for cls, raw in reqs))
    total = sum((c for c in by_class.values()), Counter())
    return {
        "requests": len(reqs),
        "status_classes": dict(total),
        "by_class": {k: dict(v) for k, v in sorted(by_class.items())},
        "failures": len(failures),
        "failure_samples": failures[:12],
    }


def run_once(export: Path, reqs, code_root: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="mffuzz") as state:
        proc, url = start_server(export, code_root, Path(state))
        try:
            start = time.monotonic()
            result = asyncio.run(fire(url, reqs))
            result["seconds"] = round(time.monotonic() - start, 1)
            try:
                result["alive_after"] = httpx.get(f"{url}/health", timeout=30).status_code == 200
            except httpx.HTTPError:
                result["alive_after"] = False
        finally:
            stop_server(proc)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--baseline-ref", default="main", help="git ref of the baseline code ('' to skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_serve.json")
    args = ap.parse_args()
    reqs = requests_for(args.requests, args.seed)
    out: dict = {"requests": args.requests, "seed": args.seed, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="mffuzzx") as tmp:
        export = build_export(Path(tmp) / "tiny", max_context=256)
        if args.baseline_ref:
            base = Path(tmp) / "base"
            base.mkdir()
            commit = subprocess.run(
                ["git", "rev-parse", "--short", args.baseline_ref], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            archive = subprocess.run(
                ["git", "archive", args.baseline_ref, "serving", "platform"], cwd=ROOT, capture_output=True, check=True
            ).stdout
            with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
                tar.extractall(base, filter="data")
            out["runs"][f"baseline {args.baseline_ref}@{commit}"] = run_once(export, reqs, base)
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        out["runs"][f"this tree (HEAD {head})"] = run_once(export, reqs, None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for label, run in out["runs"].items():
        print(
            f"{label}: {run['status_classes']} failures={run['failures']} alive_after={run['alive_after']} "
            f"({run['seconds']}s)"
        )


if __name__ == "__main__":
    main()
