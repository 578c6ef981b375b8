"""`midfill keys create|list|revoke` and `midfill usage`: who may use a local endpoint, and who did.

Keys live in the release's Secret stand-in (`<state dir>/secrets/<secret>/<key>`, midfill.apikeys
format: names and digests, never raw keys); a running endpoint re-reads the file within seconds, so a
new or revoked key takes effect without restarting anything. `usage` reads the per-key counters of
the running endpoint's /metrics (they count from the replica's start; a cluster keeps history in
Prometheus instead, see docs/serving.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import httpx
import typer

from midfill.apikeys import KeyFile
from midfill.local import serving, views
from midfill.local.state import StateStore, typed_model_release
from midfill.settings import CoreSettings

keys_app = typer.Typer(help="Named API keys of a local ModelRelease (create, list, revoke).", no_args_is_help=True)
ReleaseOpt = Annotated[
    str | None, typer.Option("--release", "-r", help="ModelRelease name (optional when there is only one with auth).")
]
FileOpt = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="Edit this keys file instead (e.g. the one you load into a cluster Secret)."),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _store() -> StateStore:
    return StateStore(CoreSettings().state_dir)


def _release_key_file(store: StateStore | None, release: str | None, file: Path | None = None) -> tuple[str, Path]:
    """(what it is for, the key file): --file, the named release's, or the only release with auth."""
    if file is not None:
        return str(file), file
    store = store or _store()
    records = [r for r in store.list("ModelRelease") if release in (None, r.name)]
    with_auth = [(r.name, serving.api_keys_file(store, typed_model_release(r))) for r in records]
    with_auth = [(n, p) for n, p in with_auth if p is not None]
    if release is not None and not records:
        raise _fail(f"modelrelease {release!r} not found (state dir {store.state_dir}); see `midfill get mr`")
    if not with_auth:
        raise _fail(
            f"modelrelease {release!r} has auth disabled" if release else "no ModelRelease with auth; apply one first"
        )
    if len(with_auth) > 1:
        raise _fail("several releases have keys; pick one with --release: " + ", ".join(n for n, _ in with_auth))
    return with_auth[0]


@keys_app.command("create")
def create(
    name: Annotated[
        str, typer.Argument(help="Who the key is for (team, tool, person): shown in metrics and `midfill usage`.")
    ],
    release: ReleaseOpt = None,
    rpm: Annotated[
        int | None, typer.Option("--rpm", min=1, help="Requests per minute this key may make (per replica).")
    ] = None,
    tpm: Annotated[
        int | None, typer.Option("--tpm", min=1, help="Prompt + completion tokens per minute (per replica).")
    ] = None,
    file: FileOpt = None,
) -> None:
    """Add a named key; prints it once (only its digest is stored)."""
    rel, path = _release_key_file(None, release, file)
    try:
        key = KeyFile(path).create(name, rpm=rpm, tpm=tpm)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    whom = "" if file is not None else f" for {rel}"
    typer.echo(f"API key {name!r}{whom} (shown once; only its digest is stored in {path}): {key}")


@keys_app.command("list")
def list_keys(release: ReleaseOpt = None, file: FileOpt = None) -> None:
    """Key names and limits (never the keys)."""
    rel, path = _release_key_file(None, release, file)
    try:
        keys = KeyFile(path).keys()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    rows = [(k.name, k.digest[:15] + "...", str(k.rpm or "-"), str(k.tpm or "-")) for k in keys]
    typer.echo(views.table(("NAME", "DIGEST", "RPM", "TPM"), rows) if rows else f"no keys for {rel}")


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="Key name (see `midfill keys list`).")],
    release: ReleaseOpt = None,
    file: FileOpt = None,
) -> None:
    """Remove one key; the endpoint refuses it within seconds, the other keys keep working."""
    rel, path = _release_key_file(None, release, file)
    try:
        KeyFile(path).revoke(name)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"revoked key {name!r} of {rel}")


_SAMPLE = re.compile(r"^midfill_key_(requests|prompt_tokens|completion_tokens|cached_tokens)_total\{(.*)\} (\S+)$")


def per_key(metrics_text: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(key name, model version): {ok, errors, prompt_tokens, completion_tokens, cached_tokens}}."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
        row = out.setdefault(
            (labels["key"], labels["model_version"]),
            dict.fromkeys(("ok", "errors", "prompt_tokens", "completion_tokens", "cached_tokens"), 0.0),
        )
        if m[1] == "requests":
            row["ok" if labels.get("status") == "200" else "errors"] += float(m[3])
        else:
            row[m[1]] += float(m[3])
    return out


def _endpoints(release: str | None, url: str | None) -> list[tuple[str, str | None]]:
    """(label, base URL) of every endpoint to read: --url, or the local releases."""
    if url:
        return [(url, url.rstrip("/"))]
    store = _store()
    records = [r for r in store.list("ModelRelease") if release in (None, r.name)]
    if not records:
        raise _fail(
            f"modelrelease {release!r} not found" if release else "no ModelRelease; apply one first, or give --url"
        )
    return [(r.name, serving.observe(store, r.name).status().url) for r in records]


def usage(
    release: ReleaseOpt = None,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Read this endpoint instead (`midfill serve`, a port-forwarded replica)."),
    ] = None,
) -> None:
    """Requests and tokens per key name and model version, from the running endpoint's /metrics."""
    rows = []
    for label, base in _endpoints(release, url):
        if not base:
            typer.echo(f"{label}: not serving (see `midfill describe mr {label}`)", err=True)
            continue
        try:
            text = httpx.get(f"{base}/metrics", timeout=10).text
        except httpx.HTTPError as exc:
            typer.echo(f"{label}: {base}/metrics did not answer ({type(exc).__name__})", err=True)
            continue
        for (key, version), r in sorted(per_key(text).items()):
            rows.append(
                (
                    key,
                    version,
                    *(f"{int(r[c])}" for c in ("ok", "errors", "prompt_tokens", "completion_tokens", "cached_tokens")),
                )
            )
    if rows:
        typer.echo(
            views.table(
                ("KEY", "MODEL VERSION", "REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS", "CACHED TOKENS"),
                rows,
            )
        )
    else:
        typer.echo("no requests counted yet")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command()(usage)
