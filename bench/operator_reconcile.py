"""Operator reconcile latency: time from TrainingRun creation to its Job's creation, and operator memory.

The operator runs as its own process (`midfill operator`, exactly as in the cluster image) against
kmock's KubernetesEmulator (an in-memory Kubernetes API over real HTTP) served from this process, with
MLflow on SQLite. Two loads: single runs created one after another, and 200 runs created at once.
Writes bench/results/operator_reconcile.json.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/operator_reconcile.py [--burst 200] [--singles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as _stdlib_platform  # noqa: F401  (the stdlib module, not our source root)
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

import kmock  # noqa: E402

from tests.operators.emulator import RESOURCES, Cluster, Emulator  # noqa: E402

SAMPLE = ROOT / "manifests" / "samples" / "trainingrun-debug.yaml"


class TimedEmulator(Emulator):
    """Records when each Job is created (the end of the measured interval)."""

    job_created: dict[str, float] = {}

    async def _handle(self, request):  # type: ignore[override]
        response = await super()._handle(request)
        if request.action == kmock.action.CREATE and request.resource is not None and request.resource.plural == "jobs":
            name = (request.data.get("metadata") or {}).get("name")
            self.job_created.setdefault(name, time.perf_counter())
        return response


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in latencies]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(percentile(ms, 0.95), 1),
        "max_ms": round(max(ms), 1),
    }


async def main(args: argparse.Namespace) -> dict:
    template = yaml.safe_load(SAMPLE.read_text())
    tmp = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    async with TimedEmulator() as emulator, kmock.Server(emulator) as server:
        for res, (kind, namespaced) in RESOURCES.items():
            emulator.resources[res] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs={"get", "list", "watch", "create", "patch", "delete"}
            )
        cluster = Cluster(emulator, server, timeout=300)  # 200 creates at once queue up
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
            f"clusters: [{{name: emu, cluster: {{server: '{server.url}'}}}}]\n"
            "users: [{name: emu, user: {token: bench}}]\ncontexts: [{name: emu, context: {cluster: emu, user: emu}}]\n"
        )
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "MIDFILL_STANDALONE": "true",
            "MIDFILL_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "MIDFILL_RESYNC_SECONDS": "600",
            "MIDFILL_HEALTH_PORT": str(free_port()),
            "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}",
        }
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "midfill"), "operator"],
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "operator.log", "w"),
        )
        ps = psutil.Process(proc.pid)
        peak_rss = 0

        async def sample_rss() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, ps.memory_info().rss)
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample_rss())
        try:
            await asyncio.sleep(2)  # operator start-up (imports, discovery, watches)

            async def create_and_wait(name: str, created: dict[str, float]) -> None:
                doc = {**template, "metadata": {"name": name}}
                created[name] = time.perf_counter()
                await cluster.create(doc)

            async def wait_jobs(names: list[str], timeout: float) -> None:
                deadline = time.perf_counter() + timeout
                while not all(f"{n}-a1" in emulator.job_created for n in names):
                    if time.perf_counter() > deadline:
                        missing = [n for n in names if f"{n}-a1" not in emulator.job_created]
                        raise RuntimeError(
                            f"no Job after {timeout}s for {len(missing)} runs, e.g. {missing[:3]}; see "
                            f"{tmp / 'operator.log'}"
                        )
                    await asyncio.sleep(0.01)

            # Warm-up run (first handler call imports lazily), not measured.
            await create_and_wait("warmup", {})
            await wait_jobs(["warmup"], 60)
            idle_rss = ps.memory_info().rss

            singles: dict[str, float] = {}
            for i in range(args.singles):
                await create_and_wait(f"single-{i}", singles)
                await wait_jobs([f"single-{i}"], 60)
            single_lat = [emulator.job_created[f"{n}-a1"] - t for n, t in singles.items()]

            burst: dict[str, float] = {}
            names = [f"burst-{i}" for i in range(args.burst)]
            await asyncio.gather(*(create_and_wait(n, burst) for n in names))
            await wait_jobs(names, 300)
            burst_lat = [emulator.job_created[f"{n}-a1"] - t for n, t in burst.items()]
            await asyncio.sleep(1)
            after_rss = ps.memory_info().rss
        finally:
            sampler.cancel()
            proc.terminate()  # kopf stops gracefully; it needs this loop (the emulator) to answer meanwhile
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "benchmark": "operator_reconcile",
        "what": "TrainingRun created -> its Job created, operator as a separate `midfill operator` process against "
        "kmock's KubernetesEmulator (same machine), MLflow on SQLite",
        "machine": f"{os.cpu_count()} CPUs (shared)",
        "single_runs": summary(single_lat),
        f"burst_{args.burst}_at_once": summary(burst_lat),
        "operator_rss_mib": {
            "idle_after_warmup": round(idle_rss / 2**20, 1),
            "after_burst": round(after_rss / 2**20, 1),
            "peak": round(peak_rss / 2**20, 1),
        },
        "objects_after_burst": {"trainingruns": args.burst + args.singles + 1, "jobs": len(emulator.job_created)},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--singles", type=int, default=20)
    result = asyncio.run(main(parser.parse_args()))
    out = ROOT / "bench" / "results" / "operator_reconcile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
