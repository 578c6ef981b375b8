"""`midfill serve` (a local Ray Serve endpoint) and `midfill complete` (ask one for a middle)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from midfill.serve_args import ServeArgs


def register(app: typer.Typer) -> None:
    """Entry point of the midfill.commands group."""
    app.command()(serve)
    app.command()(complete)


def serve(
    model: Annotated[str, typer.Option("--model", help="models:/name/3, models:/name@alias, or an export folder.")],
    port: Annotated[int, typer.Option("--port", help="HTTP port (0 = a free one).")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help="Keys file: NAME sha256:DIGEST [rpm=N] [tpm=N] per line (`midfill keys create NAME --file F`).",
        ),
    ] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys (explicit opt-out).")] = False,
    name: Annotated[str | None, typer.Option("--name", help="Model name reported by /v1/models.")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Requests decoded together.")] = 16,
    max_prefill_tokens: Annotated[
        int,
        typer.Option(
            "--max-prefill-tokens", help="Prompt tokens prefilled together per step (padded on the dynamic path)."
        ),
    ] = 2048,
    prefix_cache_tokens: Annotated[
        int, typer.Option("--prefix-cache-tokens", help="Recent prompt tokens kept for reuse (0 disables).")
    ] = 8192,
    num_cpus: Annotated[float, typer.Option("--num-cpus", help="CPUs for the replica (torch threads).")] = 1,
) -> None:
    """Serve a model locally on Ray Serve (OpenAI /v1/completions) until Ctrl-C."""
    from midfill.cli import fail
    from midfill.serve_args import ServeArgs

    if no_auth == (api_key_file is not None):
        raise fail("give exactly one of --api-key-file F and --no-auth")
    try:
        args = ServeArgs(
            model_uri=model,
            served_model_name=name,
            api_keys_file=str(api_key_file.resolve()) if api_key_file else None,
            auth_disabled=no_auth,
            max_batch_size=max_batch_size,
            max_prefill_tokens=max_prefill_tokens,
            prefix_cache_tokens=prefix_cache_tokens,
            num_cpus=num_cpus,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    _run_until_interrupted(args, host=host, port=port, fail=fail)


def _run_until_interrupted(args: ServeArgs, *, host: str, port: int, fail) -> None:
    """A private local Ray with Serve on host:port running the app, until Ctrl-C; then all of it stops."""
    import ray
    from ray import serve as ray_serve

    from midfill.serve_args import PROXY_ENV
    from serving.app import build_app

    temp_dir = tempfile.mkdtemp(prefix="mfserve", dir="/tmp")  # our own cluster, never a leftover one
    os.environ.update(PROXY_ENV)  # Ray's processes inherit it: the proxy's replica-lost answers
    ray.init(
        address="local",
        _temp_dir=temp_dir,
        include_dashboard=False,
        num_cpus=max(2, int(args.num_cpus) + 1),
        log_to_driver=False,
    )
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        try:
            ray_serve.run(build_app(args), name="midfill", route_prefix="/")
        except Exception as exc:  # a bad model URI surfaces here, from the replica's constructor
            raise fail(f"the endpoint did not start: {exc}") from None
        _print_how_to_try(args, url=f"http://{host}:{port}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("midfill: stopping")
    finally:
        ray_serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _print_how_to_try(args: ServeArgs, *, url: str) -> None:
    key = "$MIDFILL_API_KEY" if args.api_keys_file else "none"
    typer.echo(f"midfill: serving {args.model_uri} at {url}/v1 (Ctrl-C to stop)")
    typer.echo(
        f"try:\n  curl -s {url}/v1/completions -H 'Content-Type: application/json' "
        f'-H "Authorization: Bearer {key}" \\\n'
        """    -d '{"prompt": "def add(a, b):\\n    ", "suffix": "\\n    return c\\n",\n"""
        """         "max_tokens": 32, "temperature": 0}'"""
    )


def complete(
    url: Annotated[str, typer.Option("--url", help="Endpoint base URL, e.g. http://127.0.0.1:8000")],
    prefix: Annotated[str, typer.Option("--prefix", help="Code before the cursor.")],
    suffix: Annotated[str, typer.Option("--suffix", help="Code after the cursor.")] = "",
    api_key: Annotated[str | None, typer.Option("--api-key", help="API key (default: env MIDFILL_API_KEY).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0)] = 0.0,
) -> None:
    """Print the middle an endpoint proposes between --prefix and --suffix."""
    import httpx

    from midfill.cli import fail
    from serving.settings import ServingSettings

    key = api_key or ServingSettings().api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": prefix, "suffix": suffix, "max_tokens": max_tokens, "temperature": temperature}
    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/completions", json=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach {url}: {exc}") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise fail(f"HTTP {r.status_code}: {message}")
    typer.echo(r.json()["choices"][0]["text"])
