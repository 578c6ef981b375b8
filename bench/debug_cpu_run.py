"""The documented CPU run: the `debug` recipe on the Python standard library sources for 10-20 minutes.

Trains manifests/samples/trainingrun-debug.yaml with more steps (and `training.compile`, the fast
path measured in train_throughput) through the real trainer, then reads what a user would see: the
held-out loss and line-infill exact match the trainer logged to MLflow at each evaluation, and
`midfill eval`'s line-em / left-to-right on held-out stdlib files for the registered export. One
infill is printed so a reader can judge the text, not only the numbers.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/debug_cpu_run.py [--steps 1500]

Writes bench/results/debug_cpu_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "manifests/samples/trainingrun-debug.yaml"
NAME = "fim-debug-long"


def train(state: Path, *, steps: int, compile_model: bool) -> float:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"]["name"] = NAME
    t = doc["spec"]["training"]
    t.update(steps=steps, compile=compile_model, evalIntervalSteps=max(1, steps // 5), warmupSteps=max(30, steps // 20))
    doc["spec"]["checkpoint"] = {"intervalSteps": max(1, steps // 3), "keepLast": 1}
    doc["spec"]["registry"] = {"registeredModelName": NAME}
    path = state / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "MIDFILL_STATE_DIR": str(state), "MIDFILL_PROGRESS_BAR": "false"}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "trainer", "--run-file", str(path)], check=True, env=env, cwd=ROOT)
    return time.monotonic() - start


def logged_history(state: Path) -> dict[str, list[tuple[int, float]]]:
    from midfill.registry import Registry

    registry = Registry(f"sqlite:///{state / 'mlflow.db'}")
    run_id = registry.get(NAME, version="1").run_id
    out = {}
    for key in ("val_loss", "line_infill_exact_match", "tokens_per_second", "loss"):
        out[key] = [
            (m.step, m.value) for m in sorted(registry.client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--line-em", type=int, default=200)
    parser.add_argument("--l2r-windows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/debug_cpu_run.json")
    args = parser.parse_args()

    from midfill.evaluation.infill import LocalInfiller
    from midfill.evaluation.runner import run_infill_suite, run_left_to_right
    from midfill.evaluation.suites import InfillTask

    with tempfile.TemporaryDirectory(prefix="midfill-debug-run-") as tmp:
        state = Path(tmp)
        seconds = train(state, steps=args.steps, compile_model=not args.no_compile)
        history = logged_history(state)
        export = state / "runs" / NAME / "export"
        em = run_infill_suite("line-em", LocalInfiller(export), limit=args.line_em, max_new_tokens=48)
        l2r = run_left_to_right(export, limit=args.l2r_windows)
        prefix, suffix = "def mean(values):\n    total = sum(values)\n    ", "\n    return result\n"
        sample = (
            LocalInfiller(export)
            .infill(
                [InfillTask(task_id="sample", prefix=prefix, suffix=suffix, reference="", single_line=True)],
                max_new_tokens=24,
                stop=["\n"],
            )[0]
            .text
        )
    tps = [v for _, v in history["tokens_per_second"]]
    report = {
        "benchmark": "debug_cpu_run",
        "recipe": "debug",
        "steps": args.steps,
        "compile": not args.no_compile,
        "tokens_per_step": yaml.safe_load(SAMPLE.read_text())["spec"]["training"]["globalBatchTokens"],
        "wall_seconds": round(seconds, 1),
        "median_tokens_per_second": round(sorted(tps)[len(tps) // 2], 1) if tps else None,
        "val_loss": history["val_loss"],
        "trainer_line_infill_exact_match": history["line_infill_exact_match"],
        "line_em": em.metrics,
        "left_to_right": l2r.metrics,
        "sample_infill": {"prefix": prefix, "suffix": suffix, "middle": sample},
        "machine": f"{os.cpu_count()} CPUs, no GPU",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
