"""Ablation: the `debug` recipe trained causal-only vs the CodeGen2 50/50 mixture, same budget.

CodeGen2's lesson 2 ("infill is not a free lunch"): mixing in span corruption costs some
left-to-right quality and buys infilling. Both runs use the same data, steps, batch and seed; then
each export is scored on held-out stdlib files with line-em (exact match + stop rate, the model's
own infill format) and left-to-right loss.

    .venv/bin/python bench/infill_ablation.py [--steps 300] [--line-em 200] [--l2r-windows 64]

Writes bench/results/infill_ablation.json and prints a Markdown table for docs/benchmarks.md.
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


def train(name: str, objective: dict, *, steps: int, state: Path) -> tuple[Path, float]:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["objective"] = objective
    doc["spec"]["training"]["steps"] = steps
    doc["spec"]["training"]["evalIntervalSteps"] = steps
    doc["spec"]["checkpoint"] = {"intervalSteps": steps, "keepLast": 1}
    doc["spec"]["registry"] = {"registeredModelName": name}
    path = state / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "MIDFILL_STATE_DIR": str(state), "MIDFILL_PROGRESS_BAR": "false"}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "trainer", "--run", str(path)], check=True, env=env, cwd=ROOT)
    return state / "runs" / name / "export", time.monotonic() - start


def evaluate(export: Path, *, line_em: int, windows: int) -> dict[str, float]:
    from midfill.evaluation.infill import LocalInfiller
    from midfill.evaluation.runner import run_infill_suite, run_left_to_right

    em = run_infill_suite("line-em", LocalInfiller(export), limit=line_em, max_new_tokens=48)
    l2r = run_left_to_right(export, limit=windows)
    return {
        "line_em": em.metrics["exact_match"],
        "stop_rate": em.metrics["stop_rate"],
        "l2r_loss": l2r.metrics["loss"],
        "l2r_perplexity": l2r.metrics["perplexity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--line-em", type=int, default=200)
    parser.add_argument("--l2r-windows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/infill_ablation.json")
    args = parser.parse_args()
    variants = {
        "causal-only": {"causalLM": {"weight": 1.0}, "spanCorruption": {"weight": 0.0}},
        "codegen2-50-50": {"causalLM": {"weight": 0.5}, "spanCorruption": {"weight": 0.5}},
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="midfill-ablation-") as tmp:
        for name, objective in variants.items():
            export, seconds = train(f"ablation-{name.replace('.', '')}", objective, steps=args.steps, state=Path(tmp))
            results[name] = {
                "train_seconds": round(seconds, 1),
                **evaluate(export, line_em=args.line_em, windows=args.l2r_windows),
            }
            print(name, results[name], flush=True)
    report = {
        "benchmark": "infill_ablation",
        "recipe": "debug",
        "steps": args.steps,
        "tokens_per_step": yaml.safe_load(SAMPLE.read_text())["spec"]["training"]["globalBatchTokens"],
        "line_em_tasks": args.line_em,
        "l2r_windows": args.l2r_windows,
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| objective | line-em exact match | stop rate | left-to-right loss (nats/token) | perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['line_em']:.3f} | {r['stop_rate']:.3f} | {r['l2r_loss']:.3f} | {r['l2r_perplexity']:.1f} |"
        )


if __name__ == "__main__":
    main()
