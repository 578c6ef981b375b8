"""The quick evaluation a TrainingRun asks for (`spec.evaluation`), run on the registered version.

Results go on the model version (metrics as tags, the per-task JSON as an artifact) where the MLflow
UI, `midfill describe` and a ModelRelease's `approval.minMetrics` read them. A suite already recorded
on the version (a retried attempt) is not run again; a failing suite is logged and left unrecorded
(the model stays registered; the review gate then says "not evaluated").
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from midfill.api import TrainingRun
from midfill.registry import Registry, VersionInfo
from trainer.data import FileRef

log = logging.getLogger(__name__)


def local_heldout_files(validation: list[FileRef]) -> list[Path]:
    """The run's held-out files that are on this machine (remote ones would need a download)."""
    files = []
    for ref in validation:
        url = ref.url.removeprefix("file://")
        if "://" not in url and ref.kind == "code":
            files.append(Path(url))
    return files


def run_post_registration_eval(
    run: TrainingRun, *, registry: Registry, version: VersionInfo, export_dir: Path | None, validation: list[FileRef]
) -> dict[str, dict[str, float]]:
    """Run each suite of spec.evaluation not yet on the version; returns suite -> metrics recorded now."""
    from midfill.evaluation.runner import evaluate_export, record_on_version

    spec = run.spec.evaluation
    todo = [s for s in spec.suites if f"eval.{s}.run_id" not in version.tags]
    if not todo:
        return {}
    files = local_heldout_files(validation)
    recorded: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="midfill-post-eval-") as tmp:
        model_dir = (
            export_dir if export_dir and (export_dir / "midfill.json").is_file() else registry.download(version, tmp)
        )
        for suite in todo:
            suite_files = files if suite in ("line-em", "left-to-right") else None
            if suite_files is not None and not suite_files:
                log.warning(
                    "evaluation %s skipped: the run has no local held-out code files (data.validationFraction)", suite
                )
                continue
            log.info("evaluating %s on %s (%d tasks)", suite, version.uri, spec.limit)
            try:
                # A composed export's models:/ parents come from the run's registry, downloaded once
                # into this temporary folder for all suites.
                result = evaluate_export(
                    suite,
                    model_dir,
                    limit=spec.limit,
                    max_new_tokens=spec.max_new_tokens,
                    files=suite_files,
                    workers=max(1, min(4, os.cpu_count() or 1)),
                    tracking_uri=registry.tracking_uri,
                    cache_dir=Path(tmp) / "parent-cache",
                )
                record_on_version(
                    result, tracking_uri=registry.tracking_uri, name=version.name, version=version.version
                )
            except Exception:  # noqa: BLE001 - the model is registered; an evaluation failure must not fail the run
                log.exception("evaluation %s on %s failed; not recorded", suite, version.uri)
                continue
            log.info("evaluation %s: %s", suite, result.metrics)
            recorded[suite] = result.metrics
    return recorded
