"""`midfill eval MODEL --suite NAME`: evaluate an export, a registry version or a live endpoint."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from midfill.api.modelrelease import EVAL_SUITES


def register(app: typer.Typer) -> None:
    """Add `midfill eval` to the CLI."""

    @app.command(name="eval")
    def eval_command(
        model: Annotated[
            str, typer.Argument(help="An export folder, or models:/<name>/<version> | models:/<name>@<alias>.")
        ],
        suite: Annotated[str, typer.Option("--suite", help=f"One of: {', '.join(EVAL_SUITES)}.")],
        limit: Annotated[
            int | None, typer.Option("--limit", min=1, help="Tasks to run (spread over the suite).")
        ] = None,
        endpoint: Annotated[
            str | None,
            typer.Option(
                "--endpoint", help="Evaluate through a served endpoint (base URL) instead of loading weights."
            ),
        ] = None,
        api_key: Annotated[
            str | None, typer.Option("--api-key", envvar="MIDFILL_API_KEY", help="API key for --endpoint.")
        ] = None,
        data_dir: Annotated[
            Path | None,
            typer.Option(
                "--data", help="line-em / left-to-right: a folder of held-out files (default: held-out stdlib files)."
            ),
        ] = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, max=4096)] = 64,
        record: Annotated[
            bool | None,
            typer.Option(
                "--record/--no-record",
                help="Write results on the model version (default: when MODEL is a models:/ URI).",
            ),
        ] = None,
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="Also write the per-task JSON here.")
        ] = None,
    ) -> None:
        """Run an evaluation suite and print its metrics (and record them on the model version)."""
        from midfill.cli import fail
        from midfill.evaluation.runner import evaluate_export
        from midfill.settings import CoreSettings

        if suite not in EVAL_SUITES:
            raise fail(f"--suite: unknown suite {suite!r}; use one of {', '.join(EVAL_SUITES)}")
        if suite == "left-to-right" and endpoint:
            raise fail("--endpoint: left-to-right needs the model's weights (token losses); drop --endpoint")
        tracking_uri = CoreSettings().resolved_tracking_uri()
        workers = max(1, min(4, os.cpu_count() or 1))
        run = {"limit": limit, "data_dir": data_dir, "max_new_tokens": max_new_tokens, "workers": workers}
        with tempfile.TemporaryDirectory(prefix="midfill-eval-") as tmp:
            model_dir, version = _resolve_model(model, tracking_uri=tracking_uri, endpoint=endpoint, tmp=tmp, fail=fail)
            if endpoint:
                result = _through_endpoint(suite, endpoint, api_key=api_key, version=version, fail=fail, **run)
            else:
                # a composed export's models:/ parents: this registry, downloaded under the state dir
                result = evaluate_export(suite, model_dir, tracking_uri=tracking_uri, **run)
        _report(
            result, suite=suite, output=output, record=record, version=version, tracking_uri=tracking_uri, fail=fail
        )


def _resolve_model(model: str, *, tracking_uri: str, endpoint: str | None, tmp: str, fail) -> tuple[Path, Any]:
    """(export folder, registry version or None) of MODEL: a models:/ URI is resolved (and, unless
    an endpoint serves it, downloaded into `tmp`); a folder must be an export."""
    from midfill.registry import Registry, RegistryError

    model_dir, version = Path(model), None
    if model.startswith("models:/"):
        try:
            registry = Registry(tracking_uri)
            version = registry.resolve_uri(model)
            model_dir = registry.download(version, tmp) if not endpoint else model_dir
        except (RegistryError, ValueError) as exc:
            raise fail(f"MODEL: {exc}") from None
    elif not endpoint and not (model_dir / "midfill.json").is_file():
        raise fail(f"MODEL: {model} is neither a models:/ URI nor an export folder (no midfill.json)")
    return model_dir, version


def _through_endpoint(suite: str, endpoint: str, *, api_key: str | None, version, fail, **run):
    """The suite through a served endpoint, which must serve `version` when MODEL named one."""
    import openai

    from midfill.evaluation.infill import EndpointInfiller
    from midfill.evaluation.runner import run_infill_suite

    fingerprint = _check_served(endpoint, version, fail)
    infiller = EndpointInfiller(
        endpoint, api_key=api_key, model=version.name if version else None, expect_fingerprint=fingerprint
    )
    try:
        return run_infill_suite(suite, infiller, **run)
    except (openai.APIError, RuntimeError) as exc:  # refused requests, a version change midway
        raise fail(f"--endpoint: {exc}") from None


def _report(result, *, suite: str, output: Path | None, record: bool | None, version, tracking_uri: str, fail) -> None:
    """Print the metrics; write the per-task JSON; record on the version (by default for a models:/ MODEL)."""
    from midfill.evaluation.runner import record_on_version

    for name, value in result.metrics.items():
        typer.echo(f"{suite}/{name}: {value:.4g}")
    if output:
        output.write_text(result.to_json())
        typer.echo(f"per-task results: {output}")
    if record if record is not None else version is not None:
        if version is None:
            raise fail("--record needs MODEL as a models:/ URI (the version to write results on)")
        run_id = record_on_version(result, tracking_uri=tracking_uri, name=version.name, version=version.version)
        typer.echo(f"recorded on {version.uri} (MLflow run {run_id})")
    else:
        typer.echo(json.dumps({"suite": suite, "metrics": result.metrics}))


def _check_served(endpoint: str, version, fail) -> str | None:
    """With MODEL a models:/ URI, the endpoint must serve exactly that version (its /health says
    which): scores are recorded on what was evaluated, never on what an alias points at now.
    Returns the `<model>/<version>` every answer must carry (None without a registry version)."""
    from midfill.evaluation.infill import served_version

    if version is None:
        return None
    try:
        name, served = served_version(endpoint)
    except ValueError as exc:
        raise fail(f"--endpoint: {exc}") from None
    if (name, served) != (version.name, version.version):
        raise fail(
            f"--endpoint: serves {name} version {served}, but MODEL is {version.name} version {version.version}; "
            f"evaluate models:/{name}/{served} (what is served), or wait until the release serves "
            f"version {version.version}"
        )
    return f"{name}/{served}"
