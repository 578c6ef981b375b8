"""Run a suite against an infiller, score it, and record the results on a model version."""

from __future__ import annotations

import json
import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from midfill.api.modelrelease import EVAL_SUITES as SUITES
from midfill.datasplit import stdlib_root
from midfill.evaluation.infill import Completion, Infiller
from midfill.evaluation.sandbox import Limits, run_program
from midfill.evaluation.suites import (
    InfillTask,
    heldout_files,
    humaneval_multi_line,
    humaneval_single_line,
    line_em_tasks,
)


@dataclass
class TaskOutcome:
    """One task's result, as written to the per-task JSON artifact."""

    task_id: str
    completion: str
    end: str  # model | stop_string | length (midfill.evaluation.infill.EndReason)
    passed: bool
    detail: str = ""


@dataclass
class SuiteResult:
    """Metrics (name -> value) and per-task outcomes of one suite run."""

    suite: str
    model: str
    metrics: dict[str, float]
    tasks: list[TaskOutcome] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _normalize_middle(text: str, task: InfillTask) -> str:
    # The hole spans whole lines: a middle that does not end its last line would glue onto the suffix.
    return text if text.endswith("\n") else text + "\n"


def _execute(tasks: list[InfillTask], middles: list[str], *, workers: int, limits: Limits) -> list[tuple[bool, str]]:
    def one(pair: tuple[InfillTask, str]) -> tuple[bool, str]:
        task, middle = pair
        outcome = run_program(task.prefix + middle + task.suffix + (task.test or ""), limits=limits)
        return (
            outcome.status == "passed",
            f"{outcome.status}: {outcome.detail[-300:]}" if outcome.status != "passed" else "",
        )

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, zip(tasks, middles, strict=True)))


def run_infill_suite(
    suite: str,
    infiller: Infiller,
    *,
    limit: int | None = None,
    data_dir: Path | None = None,
    files: list[Path] | None = None,
    max_new_tokens: int = 64,
    workers: int = 2,
    limits: Limits = Limits(),
) -> SuiteResult:
    """Generate middles for a suite's tasks and score them (pass@1 by execution, or exact match).

    line-em reads `files` (e.g. a run's held-out files), else every file of `data_dir`, else the
    held-out part of the standard library."""
    if suite == "humaneval-single-line":
        tasks = humaneval_single_line()
    elif suite == "humaneval-multi-line":
        tasks = humaneval_multi_line()
    elif suite == "line-em":
        tasks = line_em_tasks(_heldout(files, data_dir), limit=limit or 200)
    else:
        raise ValueError(f"unknown infill suite {suite!r}; use one of {', '.join(SUITES[:3])}")
    if limit:
        tasks = tasks[:: max(1, len(tasks) // limit)][:limit]  # spread over problems, not the first few
    single = all(t.single_line for t in tasks)
    # Editors ask single-line completions to stop at the newline; multi-line holes end on the model's own stop.
    stop = ["\n"] if single else []
    completions = infiller.infill(tasks, max_new_tokens=max_new_tokens, stop=stop)
    outcomes: list[TaskOutcome] = []
    if suite.startswith("humaneval"):
        middles = [_normalize_middle(c.text, t) for c, t in zip(completions, tasks, strict=True)]
        results = _execute(tasks, middles, workers=workers, limits=limits)
        for task, comp, (ok, detail) in zip(tasks, completions, results, strict=True):
            outcomes.append(TaskOutcome(task.task_id, comp.text, comp.end, ok, detail))
        metrics = {"pass@1": _mean(o.passed for o in outcomes)}
    else:
        for task, comp in zip(tasks, completions, strict=True):
            outcomes.append(TaskOutcome(task.task_id, comp.text, comp.end, comp.text.strip() == task.reference.strip()))
        metrics = {"exact_match": _mean(o.passed for o in outcomes)}
    metrics.update(completion_metrics(tasks, completions))
    return SuiteResult(suite=suite, model=infiller.name, metrics=metrics, tasks=outcomes)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def completion_metrics(tasks: list[InfillTask], completions: list[Completion]) -> dict[str, float]:
    """How the middles ended and what they hold, for every infill suite.

    stop_rate: share the model ended with its own end token (the number the gate and docs use; a
    middle cut by a client stop string does not count). stop_string_rate / length_rate: cut by a
    client stop string / ran to max_new_tokens (the three add up to 1). whitespace_rate: middles
    that are empty or only whitespace. first_line_exact_match: the first non-blank line of the
    middle equals the reference's, spaces around it ignored."""
    pairs = list(zip(tasks, completions, strict=True))
    ends = [c.end for c in completions]
    return {
        "stop_rate": _mean(e == "model" for e in ends),
        "stop_string_rate": _mean(e == "stop_string" for e in ends),
        "length_rate": _mean(e == "length" for e in ends),
        "whitespace_rate": _mean(not c.text.strip() for c in completions),
        "first_line_exact_match": _mean(
            bool(_first_line(t.reference)) and _first_line(c.text) == _first_line(t.reference) for t, c in pairs
        ),
        "tasks": float(len(pairs)),
    }


def _heldout(files: list[Path] | None, data_dir: Path | None) -> list[Path]:
    if files is not None:
        return files
    return heldout_files(data_dir, all_files=True) if data_dir else heldout_files(stdlib_root())


def run_left_to_right(
    model_dir: Path,
    *,
    data_dir: Path | None = None,
    files: list[Path] | None = None,
    limit: int | None = None,
    seq_length: int = 512,
    tracking_uri: str | None = None,
    cache_dir: Path | None = None,
) -> SuiteResult:
    """Held-out causal loss and perplexity (plain left-to-right text, no infill format).

    A composed export is scored through its own forward (midfill.evaluation.models.window_loss):
    calm exactly as a plain model; codet5p with its encoder reading the first half of each window
    and only the tokens after it counted, as it was trained. `limit` caps the windows."""
    from midfill.evaluation.models import load_export, window_loss, windows

    loaded = load_export(model_dir, tracking_uri=tracking_uri, cache_dir=cache_dir)
    files = _heldout(files, data_dir)
    # Windows of seq_length + 1 tokens (inputs + the next token) must fit the model's positions.
    seq_length = min(seq_length, loaded.max_positions - 1)
    encoder_context = seq_length // 2 if loaded.mode == "codet5p" else None
    total_loss, total_tokens, done = 0.0, 0, 0
    for path in files:
        ids = loaded.tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)[
            "input_ids"
        ]
        for chunk, context in windows(ids, seq_length=seq_length, encoder_context=encoder_context):
            loss, counted = window_loss(loaded, chunk, context=context)
            total_loss += loss
            total_tokens += counted
            done += 1
            if limit and done >= limit:
                break
        if limit and done >= limit:
            break
    loss = total_loss / max(1, total_tokens)
    return SuiteResult(
        suite="left-to-right",
        model=str(model_dir),
        metrics={"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": float(total_tokens)},
    )


def evaluate_export(
    suite: str,
    model_dir: Path,
    *,
    limit: int | None = None,
    max_new_tokens: int = 64,
    data_dir: Path | None = None,
    files: list[Path] | None = None,
    workers: int = 2,
    tracking_uri: str | None = None,
    cache_dir: Path | None = None,
) -> SuiteResult:
    """One suite on an export folder, plain or composed, loaded in this process (what `midfill eval`
    and the trainer's post-registration evaluation run). A composition's `models:/` parents are
    resolved at `tracking_uri` and downloaded into `cache_dir` (defaults: the core settings')."""
    if suite == "left-to-right":
        return run_left_to_right(
            model_dir, data_dir=data_dir, files=files, limit=limit, tracking_uri=tracking_uri, cache_dir=cache_dir
        )
    from midfill.evaluation.infill import LocalInfiller

    infiller = LocalInfiller(model_dir, tracking_uri=tracking_uri, cache_dir=cache_dir)
    return run_infill_suite(
        suite, infiller, limit=limit, data_dir=data_dir, files=files, max_new_tokens=max_new_tokens, workers=workers
    )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def record_on_version(result: SuiteResult, *, tracking_uri: str | None, name: str, version: str) -> str:
    """Log metrics + the per-task JSON to an MLflow run and tag the model version with each metric
    (what the review gate and `midfill describe` read). Returns the MLflow run id."""
    import mlflow

    from midfill.registry import Registry, metric_tag_key

    registry = Registry(tracking_uri)
    experiment_id = registry.experiment_id("midfill-eval")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name}-v{version}-{result.suite}") as run:
        mlflow.set_tags(
            {
                "midfill.model": name,
                "midfill.version": version,
                "midfill.suite": result.suite,
                # The run page's description links back to the version it scored.
                "mlflow.note.content": (
                    f"Evaluation `{result.suite}` of [{name} version {version}](#/models/{name}/versions/{version})."
                ),
            }
        )
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in result.metrics.items()})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{result.suite}.json"
            path.write_text(result.to_json())
            mlflow.log_artifact(str(path), artifact_path="eval")
    for metric, value in result.metrics.items():
        registry.client.set_model_version_tag(name, version, metric_tag_key(result.suite, metric), f"{value:.6g}")
    registry.client.set_model_version_tag(name, version, f"eval.{result.suite}.run_id", run.info.run_id)
    from midfill import model_card

    model_card.refresh(registry, name, version)
    return run.info.run_id
