"""A/B of the CPU serving engine: a git ref's code against this tree, on the same machine in one call.

Issue 17 changed the engine for GPUs (static decode step, sampling on the device, packed prefill); on
a CPU the engine keeps its dynamic path, which must not get slower. Each side runs its own
`bench/serve_throughput.py` (engine in-process, float32, both sequential baselines in every round)
in a process of its own, with its own `serving` and `midfill` packages first on PYTHONPATH; the runs
alternate A B B A A B ... so the VM's drift (up to 2x within minutes) falls on both sides alike. Each
run's speedups are taken against the baselines measured in that same run, so the comparison is of
ratios, not of raw tokens/s across minutes.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/ab_serving.py --runs 3

Writes every run's JSON to bench/results/ab_serving/ and the summary (medians per side) to
bench/results/ab_serving.json; the table is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# main just before issue 17's engine work was merged.
DEFAULT_REF = "c5e883b"
ARGS = ["--parts", "engine", "--rounds", "1", "--requests", "32", "--dtypes", "float32"]
CONCURRENCY = ("1", "8", "32")


def extract(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_side(code: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code}:{code / 'platform'}"}
    cmd = [sys.executable, str(code / "bench" / "serve_throughput.py"), *ARGS, "--out", str(out)]
    started = time.monotonic()
    subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["ab_wall_s"] = round(time.monotonic() - started, 1)
    result["ab_load_average_1m"] = os.getloadavg()[0]
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def numbers(result: dict) -> dict:
    """Engine tokens/s and speedup over its own run's fastest baseline, per concurrency; decode steps."""
    (engine,) = result["engine_in_process"].values()  # one dtype (float32), the device's own decode path
    measured = engine["rounds"][0]
    costs = engine.get("cost_model", {})
    return {
        "baseline_tokens_per_s": measured["reference_tokens_per_s"],
        "tokens_per_s": {c: measured["runs"][c]["tokens_per_s"] for c in CONCURRENCY},
        "speedup": {c: measured["runs"][c]["speedup_vs_baseline"] for c in CONCURRENCY},
        "decode_step_ms": {r: costs.get(f"decode_step_ms_{r}_rows") for r in CONCURRENCY},
        "load_average_1m": result["ab_load_average_1m"],
    }


def median_of(runs: list[dict], group: str) -> dict:
    return {c: round(statistics.median(r[group][c] for r in runs if r[group][c] is not None), 2) for c in CONCURRENCY}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default=DEFAULT_REF, help="the A side (default: main before issue 17)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ab_serving.json")
    args = parser.parse_args()
    folder = args.out.parent / "ab_serving"
    folder.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    sides: dict[str, list[dict]] = {"ref": [], "tree": []}
    with tempfile.TemporaryDirectory(prefix="ab-serving-") as tmp:
        code = {"ref": extract(args.ref, Path(tmp) / "ref"), "tree": ROOT}
        for i in range(args.runs):
            order = ("ref", "tree") if i % 2 == 0 else ("tree", "ref")
            for side in order:
                result = run_side(code[side], folder / f"{side}_{i + 1}.json")
                sides[side].append(numbers(result))
                print(f"run {i + 1} {side}: {sides[side][-1]}", flush=True)
    summary = {
        "ref": args.ref,
        "tree": head.strip(),
        "args": ARGS,
        "runs": sides,
        "median": {
            side: {g: median_of(runs, g) for g in ("tokens_per_s", "speedup", "decode_step_ms")}
            for side, runs in sides.items()
        },
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["median"], indent=2))


if __name__ == "__main__":
    main()
