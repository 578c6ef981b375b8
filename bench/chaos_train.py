"""Chaos run of the trainer: SIGKILL one process of a 2-rank gloo torchrun gang at random points.

Each TrainingRun (tiny model, --steps steps, a checkpoint every --interval) is started as attempt 1
and killed from outside (no product hooks) at a random point, then retried as attempt 2, 3, ...
(same uid, as the operator or the local supervisor would) until an attempt finishes; kills stop
after --kills-per-run (a kill point the attempt finished before also ends the run). Kill points,
drawn at random:

  rank        a random rank, once progress reaches a random step past the last checkpoint
  checkpoint  a random rank, as soon as a new checkpoint folder appears (mostly while it is written)
  register    rank 0, a random 0-3 s after progress reached the last step (export, registration)

Per kill: the step progress showed, the checkpoint the next attempt resumed from, lost steps (the
difference). Verified independently from MLflow: every attempt logs the loss at every step, so
steps logged by more than one attempt are steps that were lost and trained again. At the end:
registry versions per run (must be 1) and whether every run reached its last step.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/chaos_train.py --runs 4 --kills-per-run 6

JSON to bench/results/chaos_train.json; the table is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))

from test_job_faults import complete_checkpoints, rank_process, torchrun  # noqa: E402
from tiny_runs import tiny_run, write_run  # noqa: E402

from midfill.progress import RUN_TAG_UID, read_progress, read_result  # noqa: E402
from midfill.registry import Registry  # noqa: E402

RESUMED = re.compile(r"resumed from \S*step-(\d+)")


def wait_for_point(gang, run_dir: Path, kind: str, rng: random.Random, steps: int) -> tuple[int, str, str] | None:
    """Block until the kill point; return (rank, what was seen, kind), or None if the gang ended first."""
    start = read_progress(run_dir).step if read_progress(run_dir) else 0  # where the last attempt got to
    if kind != "register" and start >= steps - 1:
        kind = "register"  # training is done; only the export and registration are left to hit
    target = rng.randint(start + 1, steps - 1) if kind == "rank" else None
    seen_before = {p.name for p in (run_dir / "checkpoints").glob("step-*")}
    started = time.time()
    deadline = time.monotonic() + 600
    while gang.poll() is None and time.monotonic() < deadline:
        progress = read_progress(run_dir)
        step = progress.step if progress else 0
        if kind == "rank" and step >= target:
            return rng.randint(0, 1), f"step {step}", kind
        if kind == "checkpoint":  # as soon as a new checkpoint folder shows up: mostly mid-write
            new = [p for p in (run_dir / "checkpoints").glob("step-*") if p.name not in seen_before]
            if new:
                state = "complete" if (new[0] / "COMPLETE").exists() else "being written"
                return rng.randint(0, 1), f"{new[0].name} {state}", kind
        if kind == "register" and step >= steps and _written_since(run_dir, started):  # not the last attempt's file
            time.sleep(rng.uniform(0, 3))
            return 0, "after the last step", kind
        time.sleep(0.02)
    return None


def _written_since(run_dir: Path, t: float) -> bool:
    try:
        return (run_dir / "progress.json").stat().st_mtime >= t
    except FileNotFoundError:
        return False


def one_run(root: Path, name: str, rng: random.Random, *, steps: int, interval: int, kills: int) -> dict:
    doc = tiny_run(name, steps=steps, logIntervalSteps=1, evalIntervalSteps=steps)
    doc["spec"]["checkpoint"] = {"intervalSteps": interval, "keepLast": 2}
    run_file = write_run(root / f"{name}.yaml", doc)
    run_dir = root / "state" / "runs" / name
    events, attempt = [], 0
    while True:
        attempt += 1
        gang = torchrun(root, run_file, uid=f"uid-{name}", attempt=attempt)
        event = None
        if len([e for e in events if e["killed"]]) < kills:
            kind = rng.choice(["rank", "rank", "checkpoint", "register"])
            point = wait_for_point(gang, run_dir, kind, rng, steps)
            if point is not None and gang.poll() is None:
                rank, seen, kind = point
                progress = read_progress(run_dir)
                try:
                    rank_process(gang, rank).send_signal(signal.SIGKILL)
                    event = {
                        "attempt": attempt,
                        "kind": kind,
                        "rank": rank,
                        "seen": seen,
                        "killed": True,
                        "step_at_kill": progress.step if progress else 0,
                        "complete_at_kill": complete_checkpoints(run_dir),
                    }
                except LookupError:  # the rank had already exited (the gang was finishing)
                    pass
        _, err = gang.communicate(timeout=900)
        # The kill before this attempt is settled by the first later attempt that got as far as
        # loading a checkpoint (one killed before that leaves it pending); none found: from step 0.
        resumed = RESUMED.search(err)
        pending = [e for e in events if "resumed_from" not in e]
        if pending and (resumed or gang.returncode == 0):
            for e in pending:
                e["resumed_from"] = int(resumed.group(1)) if resumed else 0
                e["lost_steps"] = max(0, e["step_at_kill"] - e["resumed_from"]) if e is pending[-1] else 0
        if event is not None:
            event["returncode"] = gang.returncode
            events.append(event)
        if gang.returncode == 0:
            break
        if event is None:
            raise RuntimeError(f"attempt {attempt} of {name} failed without a kill: {err[-3000:]}")
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}")
    return {
        "name": name,
        "attempts": attempt,
        "events": events,
        "versions": [v.version for v in registry.versions(name)],
        "final_step": read_progress(run_dir).step,
        "result_version": (read_result(run_dir) or None) and read_result(run_dir).version,
        "redone_steps_mlflow": redone_steps(registry, f"uid-{name}"),
    }


def redone_steps(registry: Registry, uid: str) -> int:
    """Steps whose loss was logged by more than one attempt (each attempt is its own MLflow run)."""
    client = registry.client
    experiment = client.get_experiment_by_name("midfill")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG_UID}` = '{uid}'")
    logged = Counter()
    for run in runs:
        logged.update({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    return sum(n - 1 for n in logged.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--kills-per-run", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos_train.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mfchaos") as tmp:
        runs = [
            one_run(Path(tmp), f"chaos-{i}", rng, steps=args.steps, interval=args.interval, kills=args.kills_per_run)
            for i in range(args.runs)
        ]
    kills = [e for r in runs for e in r["events"] if e["killed"]]
    lost = [e["lost_steps"] for e in kills]
    summary = {
        "runs": len(runs),
        "kills": len(kills),
        "kills_by_kind": dict(Counter(e["kind"] for e in kills)),
        "duplicate_versions": sum(max(0, len(r["versions"]) - 1) for r in runs),
        "runs_without_a_version": sum(1 for r in runs if not r["versions"]),
        "runs_finished": sum(1 for r in runs if r["final_step"] == args.steps),
        "lost_steps_total": sum(lost),
        "lost_steps_max_per_kill": max(lost, default=0),
        "kills_losing_more_than_one_interval": sum(1 for n in lost if n > args.interval),
        "redone_steps_mlflow_total": sum(r["redone_steps_mlflow"] for r in runs),
        "seconds": round(time.monotonic() - start),
    }
    out = {"settings": vars(args) | {"out": str(args.out)}, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
