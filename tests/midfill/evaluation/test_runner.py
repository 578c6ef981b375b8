"""Scoring and recording: pass@1 by execution, exact match, stop rate, results on the version."""

from __future__ import annotations

from pathlib import Path

import pytest

from midfill.evaluation.infill import Completion, finish
from midfill.evaluation.runner import record_on_version, run_infill_suite
from midfill.evaluation.suites import InfillTask
from midfill.registry import MIN_GATE_TASKS, Registry, unmet_approval


class ReferenceInfiller:
    """Answers with the task's reference middle, ended by its own end token (multi-line holes) or
    cut at the newline (single-line holes), as a model that knows where the middle ends would;
    every `wrong_every`-th answer is replaced by a wrong line instead."""

    name = "reference"

    def __init__(self, wrong_every: int = 0) -> None:
        self.wrong_every = wrong_every

    def infill(self, tasks: list[InfillTask], *, max_new_tokens: int, stop: list[str]) -> list[Completion]:
        out = []
        for i, task in enumerate(tasks):
            text = task.reference.rstrip("\n") if stop == ["\n"] else task.reference
            if self.wrong_every and i % self.wrong_every == 0:
                text = "    raise SystemExit(3)"
            out.append(Completion(text=text, end="model"))
        return out


def test_pass_at_1_by_execution() -> None:
    perfect = run_infill_suite("humaneval-single-line", ReferenceInfiller(), limit=12)
    assert perfect.metrics["pass@1"] == 1.0 and perfect.metrics["tasks"] == 12
    half = run_infill_suite("humaneval-single-line", ReferenceInfiller(wrong_every=2), limit=12)
    assert half.metrics["pass@1"] == 0.5
    failed = [t for t in half.tasks if not t.passed]
    assert len(failed) == 6 and all(t.detail.startswith("failed") for t in failed)


def test_multi_line_suite_uses_the_models_own_stop() -> None:
    result = run_infill_suite("humaneval-multi-line", ReferenceInfiller(), limit=6)
    assert result.metrics["pass@1"] == 1.0


def test_line_em_scores_exact_match(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n\n\nvalue = f(41)\nprint(value)\n")
    result = run_infill_suite("line-em", ReferenceInfiller(), limit=3, data_dir=tmp_path)
    assert result.metrics["exact_match"] == 1.0 and result.metrics["stop_rate"] == 1.0
    assert result.metrics["tasks"] == 1  # the one statement inside a function body


class ScriptedInfiller:
    """Answers every task with the next of a fixed list of raw model outputs (text the model
    generated before its end token, or all of it when it never emitted one), through the same
    `finish` the real infillers use."""

    name = "scripted"

    def __init__(self, outputs: list[tuple[str, bool]]) -> None:
        self.outputs = outputs

    def infill(self, tasks, *, max_new_tokens: int, stop: list[str]) -> list[Completion]:
        pairs = zip(self.outputs, tasks, strict=True)
        return [finish(text, model_ended=ended, stop=stop) for (text, ended), _ in pairs]


def test_line_em_counts_how_each_middle_ended_and_what_it_holds(tmp_path: Path) -> None:
    body = "".join(f"    value_{i} = compute({i})\n" for i in range(8))
    (tmp_path / "m.py").write_text(f"def f(compute):\n{body}    return value_0\n")
    tasks = run_infill_suite("line-em", ScriptedInfiller([("", True)] * 9), data_dir=tmp_path).tasks
    refs = [f"value_{i} = compute({i})" for i in range(8)] + ["return value_0"]
    outputs = [
        (refs[0], True),  # right, ended by <eom>
        (refs[1] + "\n    x = 1", True),  # right first line, the model went on: cut by "\n"
        (refs[2] + "\n", False),  # right first line, cut by "\n", the model never ended it
        ("        ", False),  # whitespace until max tokens
        ("   \n", True),  # whitespace, cut by "\n"
        ("", True),  # empty middle, ended by <eom>: whitespace-only too
        ("wrong = 1", True),
        ("wrong = 2", False),
        ("  " + refs[8] + "  ", True),  # spaces around the line do not count against it
    ]
    scripted = [outputs[int(t.task_id.split(":")[1]) - 2] for t in tasks]  # task order is shuffled; line 2 is refs[0]
    result = run_infill_suite("line-em", ScriptedInfiller(scripted), data_dir=tmp_path)
    m = result.metrics
    assert m["tasks"] == 9
    assert (m["stop_rate"], m["stop_string_rate"], m["length_rate"]) == pytest.approx((4 / 9, 3 / 9, 2 / 9))
    assert m["whitespace_rate"] == pytest.approx(3 / 9)
    assert m["first_line_exact_match"] == pytest.approx(4 / 9)
    assert m["exact_match"] == pytest.approx(4 / 9)  # what is left after the cut, stripped
    assert sorted(t.end for t in result.tasks) == sorted(["model"] * 4 + ["stop_string"] * 3 + ["length"] * 2)


def test_a_stop_string_counts_only_when_it_comes_before_the_models_own_end() -> None:
    assert finish("x = 1", model_ended=True, stop=["\n"]).end == "model"
    assert finish("x = 1\ny", model_ended=True, stop=["\n"]) == Completion("x = 1", "stop_string")
    assert finish("x = 1", model_ended=False, stop=["\n"]).end == "length"
    assert finish("x = 1\n", model_ended=False, stop=[]) == Completion("x = 1\n", "length")


def test_results_recorded_on_the_version_open_the_gate(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = Registry(uri)
    info, _ = registry.register(name="fim", source=str(tmp_path), run_uid="u1")
    gate = {"humaneval-single-line/pass@1": 0.75}
    missing = unmet_approval(info, required_tags={}, required_alias=None, min_metrics=gate)
    assert missing and "not evaluated" in missing[0]

    low = run_infill_suite("humaneval-single-line", ReferenceInfiller(wrong_every=2), limit=MIN_GATE_TASKS)
    record_on_version(low, tracking_uri=uri, name="fim", version=info.version)
    below = unmet_approval(
        registry.get("fim", version=info.version), required_tags={}, required_alias=None, min_metrics=gate
    )
    assert below == ["metric humaneval-single-line/pass@1 >= 0.75 (is 0.5)"]

    # A perfect score from a handful of tasks does not open the gate.
    few = run_infill_suite("humaneval-single-line", ReferenceInfiller(), limit=2)
    record_on_version(few, tracking_uri=uri, name="fim", version=info.version)
    (too_few,) = unmet_approval(
        registry.get("fim", version=info.version), required_tags={}, required_alias=None, min_metrics=gate
    )
    assert f"evaluated on 2 tasks; the gate counts runs of at least {MIN_GATE_TASKS}" in too_few

    high = run_infill_suite("humaneval-single-line", ReferenceInfiller(), limit=MIN_GATE_TASKS)
    run_id = record_on_version(high, tracking_uri=uri, name="fim", version=info.version)
    version = registry.get("fim", version=info.version)
    assert unmet_approval(version, required_tags={}, required_alias=None, min_metrics=gate) == []
    assert version.tags["eval.humaneval-single-line.run_id"] == run_id
    artifact = Path(registry.client.download_artifacts(run_id, "eval/humaneval-single-line.json", str(tmp_path)))
    assert '"task_id": "SingleLineInfilling/HumanEval/' in artifact.read_text()
