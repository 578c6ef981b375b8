"""The `midfill` command line.

The core defines the commands that need only the core (version, crds, validate). Components add
their own (serve, operator, render, apply, ...) through the `midfill.commands` entry-point group:
each entry point is a `register(app: typer.Typer) -> None` function living next to the code it
drives, so this module never imports a component.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

from midfill import __version__

app = typer.Typer(
    name="midfill",
    help="Train and serve fill-in-the-middle code models on Kubernetes, or on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ENTRY_POINT_GROUP = "midfill.commands"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def version() -> None:
    """Print the midfill version."""
    typer.echo(f"midfill {__version__}")


@app.command()
def crds(
    out: Annotated[Path | None, typer.Option("--out", help="Write one YAML file per CRD into this folder.")] = None,
) -> None:
    """Print (or write) the CustomResourceDefinitions generated from midfill.api."""
    from midfill.crds import render_crds, write_crds

    if out is None:
        typer.echo("---\n".join(render_crds().values()), nl=False)
        return
    for path in write_crds(out):
        typer.echo(f"wrote {path}")


@app.command()
def validate(
    file: Annotated[Path, typer.Option("-f", "--file", help="YAML file with TrainingRun/ModelRelease documents.")],
    gpu_memory_gb: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory-gb", min=1, help="GPU memory of the node pool (default: read from nodePool.nodeSelector)."
        ),
    ] = None,
) -> None:
    """Check resources against the API; one line per invalid field (exit 1), else a summary and, for
    each TrainingRun, its estimated memory per GPU with a warning when it will not fit."""
    from midfill.api import SpecError, load_file

    try:
        resources = load_file(file)
    except SpecError as exc:
        prefix = f"{exc.source}: " if exc.source else ""
        for err in exc.errors:
            typer.echo(f"{prefix}{err.path}: {err.message}", err=True)
        raise typer.Exit(1) from None
    names = ", ".join(f"{r.kind}/{r.metadata.name}" for r in resources)
    typer.echo(f"{file}: valid ({names})")
    for resource in resources:
        if resource.kind == "TrainingRun":
            _print_memory_estimate(resource, gpu_memory_gb)


def _print_memory_estimate(run: Any, gpu_memory_gb: float | None) -> None:
    """The run's estimated memory per GPU and per node, with a warning for what will not fit."""
    from midfill import memory

    est = memory.estimate(run.spec)
    if est is None:
        typer.echo(f"TrainingRun/{run.metadata.name}: composed run; memory follows from its parent models")
        return
    p, t = run.spec.parallelism, run.spec.training
    layout = (
        f"{p.strategy} over {p.world_size()} processes, {t.micro_batch_size} x {t.seq_length} tokens per micro-batch"
    )
    typer.echo(f"TrainingRun/{run.metadata.name} memory estimate ({layout}):")
    typer.echo(est.summary())
    pool = memory.pool_gpu_memory(run.spec.node_pool)
    gpu_gib = gpu_memory_gb if gpu_memory_gb is not None else pool[0] if pool else None
    if gpu_memory_gb is not None:
        typer.echo(f"  GPU memory            {gpu_memory_gb:.0f} GiB (--gpu-memory-gb)")
    elif pool:
        typer.echo(f"  GPU memory            {pool[0]:.0f} GiB (nodePool.nodeSelector {pool[1]})")
    elif run.spec.resources.gpus():
        typer.echo(
            "  GPU memory            unknown: pass --gpu-memory-gb, or select the pool by a label that names "
            f"the GPU ({', '.join(memory.GPU_LABELS)})"
        )
    for warning in memory.warnings(run.spec, est, gpu_gib=gpu_gib):
        typer.echo(f"warning: TrainingRun/{run.metadata.name}: {warning}", err=True)


@app.command("mlflow-gate")
def mlflow_gate(
    upstream: Annotated[str, typer.Option(help="The MLflow server to protect (listening on localhost only).")] = (
        "http://127.0.0.1:5001"
    ),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on (the MLflow Service's target port).")] = 5000,
    anonymous_read: Annotated[
        bool, typer.Option("--anonymous-read/--no-anonymous-read", help="Let requests without credentials read.")
    ] = True,
) -> None:
    """Basic auth in front of MLflow: operator, trainer and reviewer credentials; only reviewers approve.

    Credentials come from MIDFILL_GATE_{OPERATOR,TRAINER,REVIEWER}_{USERNAME,PASSWORD}."""
    from midfill.mlflow_gate import GateSettings, serve

    try:
        settings = GateSettings.from_env(upstream, anonymous_read)
    except ValueError as exc:
        raise fail(str(exc)) from None
    serve(settings, host=host, port=port)


def _load_component_commands() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register = ep.load()
        except ImportError as exc:  # a component whose dependencies are not installed here
            missing = exc.name or str(exc)

            @app.command(
                name=ep.name, hidden=True, context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
            )
            def _unavailable(_name: str = ep.name, _missing: str = missing) -> None:
                raise fail(f"`midfill {_name}` is not available: missing module {_missing}")

            continue
        register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _load_component_commands()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="midfill")
