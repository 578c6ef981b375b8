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


def run_side(code: Path, out: Path, bench_args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code}:{code / 'platform'}"}
    cmd = [sys.executable, str(code / "bench" / "serve_throughput.py"), *bench_args, "--out", str(out)]
    started = time.monotonic()
    subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["ab_wall_s"] = round(time.monotonic() - started, 1)
    result["ab_load_average_1m"] = os.getloadavg()[0]
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def numbers(result: dict) -> dict:
    """Per configuration (engine/endpoint x dtype) the speedup over the run's own fastest baseline
    per concurrency (median over the run's rounds); the engine's tokens/s and decode steps per dtype."""
    summary = result["summary_speedup_vs_fastest_baseline"]
    engines = result["engine_in_process"]
    return {
        "speedup": {cfg: {c: v[c]["median"] for c in CONCURRENCY if c in v} for cfg, v in summary.items()},
        "tokens_per_s": {
            dtype: {c: statistics.median(r["runs"][c]["tokens_per_s"] for r in engine["rounds"]) for c in CONCURRENCY}
            for dtype, engine in engines.items()
        },
        "decode_step_ms": {
            dtype: {r: engine.get("cost_model", {}).get(f"decode_step_ms_{r}_rows") for r in CONCURRENCY}
            for dtype, engine in engines.items()
        },
        "load_average_1m": result["ab_load_average_1m"],
    }


def medians(runs: list[dict], group: str) -> dict:
    """Median over runs of `group` (config -> concurrency -> value), for what every run measured."""
    configs = set.intersection(*(set(r[group]) for r in runs))
    return {
        cfg: {
            c: round(statistics.median(r[group][cfg][c] for r in runs), 2)
            for c in CONCURRENCY
            if all(r[group][cfg].get(c) is not None for r in runs)
        }
        for cfg in sorted(configs)
        if any(r[group][cfg] for r in runs)  # e.g. the endpoint's p95 ratio: no concurrency keys
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default=DEFAULT_REF, help="the A side (default: main before issue 17)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="serve_throughput at its defaults (both dtypes, the Ray endpoint, 3 rounds of 64 requests: "
        "5-10 minutes a run) instead of the engine in float32",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/ab_serving[_defaults].json")
    args = parser.parse_args()
    bench_args = [] if args.defaults else ARGS
    args.out = args.out or ROOT / "bench" / "results" / (
        "ab_serving_defaults.json" if args.defaults else "ab_serving.json"
    )
    folder = args.out.with_suffix("")  # every run's own JSON
    folder.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    sides: dict[str, list[dict]] = {"ref": [], "tree": []}
    with tempfile.TemporaryDirectory(prefix="ab-serving-") as tmp:
        code = {"ref": extract(args.ref, Path(tmp) / "ref"), "tree": ROOT}
        for i in range(args.runs):
            order = ("ref", "tree") if i % 2 == 0 else ("tree", "ref")
            for side in order:
                result = run_side(code[side], folder / f"{side}_{i + 1}.json", bench_args)
                sides[side].append(numbers(result))
                print(f"run {i + 1} {side}: {sides[side][-1]}", flush=True)
    summary = {
        "ref": args.ref,
        "tree": head.strip(),
        "args": bench_args,
        "runs": sides,
        "median": {
            side: {g: medians(runs, g) for g in ("speedup", "tokens_per_s", "decode_step_ms")}
            for side, runs in sides.items()
        },
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["median"], indent=2))


if __name__ == "__main__":
    main()
