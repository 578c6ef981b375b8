"""`midfill operator` (run the operator) and `midfill render -f FILE` (print what it would create)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

import typer


def render_objects(
    path: Path, *, version: str | None = None, attempt: int = 1
) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects the operator would create for each resource in the file, and header comments.

    No cluster and no MLflow: a ModelRelease following an alias is rendered with `--version` when
    given (what the operator writes after resolving the alias), else with the alias URI itself.
    """
    from midfill.api import FieldError, ModelRelease, SpecError, TrainingRun, load_file
    from operators.modelrelease.builders import build_rayservice
    from operators.settings import OperatorSettings
    from operators.trainingrun.builders import build_attempt, shared_storage_problem

    settings = OperatorSettings()
    objects: list[dict[str, Any]] = []
    notes: list[str] = []
    for res in load_file(path):
        res.metadata.namespace = res.metadata.namespace or "default"
        if not res.metadata.uid:
            # A fresh one per render: the uid also names the run's MLflow run and rendezvous, so YAML
            # rendered twice and applied directly must not make two runs share them.
            res.metadata.uid = str(uuid.uuid4())
            notes.append(
                f"{res.kind}/{res.metadata.name}: uid {res.metadata.uid} is a random stand-in "
                "(the API server assigns the real one)"
            )
        if isinstance(res, TrainingRun):
            problem = shared_storage_problem(res, settings)
            if problem:
                raise SpecError([FieldError("spec.parallelism.numNodes", problem)], source=str(path))
            deadline = res.spec.active_deadline_seconds
            objects += build_attempt(res, attempt=attempt, settings=settings, active_deadline_seconds=deadline)
        elif isinstance(res, ModelRelease):
            pinned = str(res.spec.model.version) if res.spec.model.version is not None else None
            chosen = version or pinned
            if chosen is None:
                notes.append(
                    f"ModelRelease/{res.metadata.name}: model URI left as alias {res.spec.model.effective_alias()!r}; "
                    "the operator pins the version the alias resolves to (pass --version N to render that)"
                )
            objects.append(build_rayservice(res, version=chosen, settings=settings))
    return objects, notes


def register(app: typer.Typer) -> None:
    @app.command()
    def operator() -> None:
        """Run the Kubernetes operator (settings from MIDFILL_* environment variables)."""
        import asyncio

        import kopf

        import operators.main  # noqa: F401  (registers the handlers)
        from operators.settings import OperatorSettings

        settings = OperatorSettings()
        namespaces = settings.namespaces()
        asyncio.run(
            kopf.operator(
                clusterwide=not namespaces,
                namespaces=namespaces,
                # Peering is configured in operators/startup.py (kopf's peering CRDs are optional).
                liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
                memo=kopf.Memo(settings=settings),
            )
        )

    @app.command()
    def render(
        file: Annotated[Path, typer.Option("-f", "--file", help="YAML with TrainingRun/ModelRelease documents.")],
        version: Annotated[
            str | None,
            typer.Option(
                "--version",
                help="ModelRelease: the registry version to render (default: the pinned one, else the alias URI).",
            ),
        ] = None,
        attempt: Annotated[
            int, typer.Option("--attempt", min=1, help="TrainingRun: which attempt's objects. Default 1.")
        ] = 1,
    ) -> None:
        """Print, as YAML, the Kubernetes objects the operator would create (no cluster needed)."""
        import yaml

        from midfill.api import SpecError

        try:
            objects, notes = render_objects(file, version=version, attempt=attempt)
        except SpecError as exc:
            prefix = f"{exc.source}: " if exc.source else ""
            for err in exc.errors:
                typer.echo(f"{prefix}{err.path}: {err.message}", err=True)
            raise typer.Exit(1) from None
        header = "".join(f"# {note}\n" for note in notes)

        class _NoAliases(yaml.SafeDumper):  # objects share lists (env, exit codes): print each in full
            def ignore_aliases(self, data: Any) -> bool:
                return True

        typer.echo(header + yaml.dump_all(objects, Dumper=_NoAliases, sort_keys=False), nl=False)
