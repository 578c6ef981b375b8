"""Chaos run of the operator: `midfill operator` SIGKILLed at random moments (each a random 0.2-4 s
after it came up again) while TrainingRuns and ModelReleases go through their lifecycles on the
Kubernetes emulator, with a real `mlflow server`. The harness plays the Job controller, the
trainer, KubeRay, the replicas' /health and a reviewer (tests/operators/chaos.py).

Counted at the end: objects created more than once, attempts beyond each run's script, runs
with other than one registered version, resources not in the phase their script implies.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/chaos_operator.py --runs 35 --releases 15 --kills 15

JSON to bench/results/chaos_operator.json; the table is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mlflow_server import MlflowServer  # noqa: E402
from tests.operators.chaos import OperatorProcess, Plan, ProgressLog, World, killing, play, verdict  # noqa: E402
from tests.operators.emulator import emulated_cluster  # noqa: E402


async def run(args: argparse.Namespace, work: Path) -> dict:
    rng = random.Random(args.seed)
    plan = Plan.draw(runs=args.runs, releases=args.releases, rng=rng)
    t0 = time.monotonic()
    with MlflowServer(work / "mlflow") as mlflow:
        async with emulated_cluster(work) as (cluster, kubeconfig):
            world = World(cluster, mlflow.uri, plan)
            op = OperatorProcess(
                kubeconfig,
                mlflow.uri,
                work / "operator.log",
                health_url=world.endpoints.url_template,
                resync_seconds=args.resync_seconds,
            )
            with world.endpoints.running():
                async with killing(op, rng, after_ready=(0.2, 4), kills=args.kills) as kills:
                    settled = await play(
                        cluster,
                        world,
                        plan,
                        timeout=args.timeout,
                        waves=args.waves,
                        wave_seconds=args.wave_seconds,
                        kills_done=lambda: len(kills) >= args.kills,
                        log=ProgressLog(world),
                    )
                op.kill()
            result = verdict(cluster, plan, world.registry)
    return {
        "settings": vars(args),
        "settled": settled,
        "seconds": round(time.monotonic() - t0, 1),
        "operator_kills": len(kills),
        "world_actions_retried": world.hiccups,
        "kill_times_s": kills,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        type=int,
        default=35,
        help="TrainingRuns (scripts cycle: succeed, crash+succeed, exit 78, crash+crash)",
    )
    parser.add_argument("--releases", type=int, default=15, help="ModelReleases of succeeding runs' versions")
    parser.add_argument("--kills", type=int, default=15, help="operator SIGKILLs in all")
    parser.add_argument(
        "--waves", type=int, default=5, help="runs are created in this many waves, so kills land in every phase"
    )
    parser.add_argument("--wave-seconds", type=float, default=15, help="between waves of runs")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=5,
        help="the operator's resync timer (default 30 on a cluster; every active run asks MLflow each time, and "
        "the one-worker SQLite MLflow here falls behind at 1 s with tens of runs)",
    )
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos_operator.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-operator-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("kill_times_s", "settings")}, indent=2))
    bad = result["objects_created_twice"] or result["attempts_beyond_script"] or result["runs_with_wrong_version_count"]
    sys.exit(1 if bad or result["wrong_final_phase"] or not result["settled"] else 0)


if __name__ == "__main__":
    main()
