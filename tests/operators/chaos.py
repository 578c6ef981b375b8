"""Chaos for the operator: the real operator process (`midfill operator`) against the Kubernetes
emulator and a real `mlflow server`, SIGKILLed at random moments and started again while
TrainingRuns and ModelReleases go through their lifecycles.

The harness plays the rest of the cluster: the Job controller and the trainer (each attempt runs,
then crashes, exits 78 or registers a version and completes, as its run's script says), KubeRay
(a RayService becomes RUNNING) and a reviewer (approves the version). Afterwards `verdict()` checks
that every object was created once, every run registered one version and every resource ended in
the phase its script implies. Used by tests/operators/test_operator_restarts.py (short) and
bench/chaos_operator.py (>= 50 lifecycles).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from operators.modelrelease.builders import ANNOTATION_VERSION
from operators.trainingrun.builders import LABEL_ATTEMPT, LABEL_RUN
from tests.mlflow_server import free_port
from tests.operators.emulator import Cluster
from tests.operators.serve_endpoint import ServeEndpoints

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"
# What each attempt of a run does, and how the run must end: (script, phase, reason or None).
SCRIPTS: list[tuple[tuple[str, ...], str, str | None]] = [
    (("succeed",), "Succeeded", None),
    (("crash", "succeed"), "Succeeded", None),
    (("exit78",), "Failed", "NonRetryableExitCode"),
    (("crash", "crash"), "Failed", "MaxRestartsExceeded"),
]


@dataclass
class Plan:
    runs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # run name -> attempt script
    releases: list[str] = field(default_factory=list)  # run names whose version gets a release

    @classmethod
    def draw(cls, runs: int, releases: int, rng: random.Random) -> Plan:
        plan = cls()
        for i in range(runs):
            plan.runs[f"run-{i}"] = SCRIPTS[i % len(SCRIPTS)][0]
        succeeding = [n for n, s in plan.runs.items() if s[-1] == "succeed"]
        plan.releases = rng.sample(succeeding, min(releases, len(succeeding)))
        return plan


def training_run(name: str, script: tuple[str, ...]) -> dict[str, Any]:
    doc = yaml.safe_load((SAMPLES / "trainingrun-debug.yaml").read_text())
    doc["metadata"] = {"name": name}
    doc["spec"]["registry"]["registeredModelName"] = name
    doc["spec"]["failurePolicy"] = {"maxRestarts": 1}
    return doc


def model_release(run: str) -> dict[str, Any]:
    doc = yaml.safe_load((SAMPLES / "modelrelease.yaml").read_text())
    doc["metadata"] = {"name": f"rel-{run}"}
    doc["spec"]["model"]["registeredModelName"] = run
    return doc


class OperatorProcess:
    """`midfill operator` as its own process group, killed with SIGKILL (no shutdown handlers run)."""

    def __init__(
        self, kubeconfig: Path, tracking_uri: str, log: Path, *, health_url: str, resync_seconds: float = 1
    ) -> None:
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
        }
        self.env |= {
            "KUBECONFIG": str(kubeconfig),
            "MIDFILL_TRACKING_URI": tracking_uri,
            "MIDFILL_STANDALONE": "true",
            "MIDFILL_RESYNC_SECONDS": str(resync_seconds),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MIDFILL_ENDPOINT_HEALTH_URL": health_url,
        }
        self.log, self.proc, self.starts = log, None, 0

    def start(self) -> None:
        self.env["MIDFILL_HEALTH_PORT"] = str(free_port())
        midfill = Path(sys.executable).parent / "midfill"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [str(midfill), "operator"], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1

    async def wait_ready(self, timeout: float = 180) -> None:
        """Until its liveness endpoint answers (kopf serves it once the operator is running)."""
        import aiohttp

        url = f"http://127.0.0.1:{self.env['MIDFILL_HEALTH_PORT']}/healthz"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.3)
        raise TimeoutError(f"the operator did not come up in {timeout} s; see {self.log}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class World:
    """The cluster's other actors, as the emulator cannot run them."""

    def __init__(self, cluster: Cluster, tracking_uri: str, plan: Plan) -> None:
        from midfill.registry import Registry

        self.cluster, self.plan = cluster, plan
        self.registry = Registry(tracking_uri, retry_seconds=60)
        self.jobs_seen: dict[str, float] = {}  # Job name -> when it was first seen running
        self.finished: set[str] = set()
        self.approved: set[str] = set()
        self.hiccups = 0  # world actions that timed out and were tried again
        # Ending a Job (registering its version first) and approving run beside the loop, one per
        # key, so a slow tracking server delays those objects only, not every Job's scripted status.
        self.busy: dict[str, asyncio.Task] = {}
        self.endpoints = ServeEndpoints()  # the replicas' /health: serves what KubeRay made RUNNING

    async def step(self) -> None:
        await self._jobs()
        await self._releases()

    async def _jobs(self) -> None:
        for name in self.cluster.names("jobs"):
            job = self.cluster.get("jobs", name)
            if job is None or name in self.finished or job["metadata"].get("deletionTimestamp"):
                continue
            labels = job["metadata"]["labels"]
            run, attempt = labels[LABEL_RUN], int(labels[LABEL_ATTEMPT])
            if name not in self.jobs_seen:
                self.jobs_seen[name] = time.monotonic() + random.uniform(0.5, 3)
                running = {"active": 1, "ready": 1, "startTime": job["metadata"]["creationTimestamp"]}
                await self.cluster.patch("jobs", name, {"status": running}, "status")
                continue
            if time.monotonic() < self.jobs_seen[name]:
                continue
            script = self.plan.runs[run]
            what = script[attempt - 1] if attempt <= len(script) else "crash"  # verdict() counts it
            self.beside(f"job/{name}", self._end_job(job, run, what))

    async def _end_job(self, job: dict[str, Any], run: str, what: str) -> None:
        name = job["metadata"]["name"]
        if what == "succeed":  # the trainer's last act: register the export, once per run uid
            uid = job["metadata"]["ownerReferences"][0]["uid"]
            register = functools.partial(self.registry.register, name=run, source=f"s3://chaos/{run}", run_uid=uid)
            await asyncio.get_running_loop().run_in_executor(None, register)
        await self.cluster.patch("jobs", name, {"status": _final_status(what, name)}, "status")
        self.finished.add(name)

    def beside(self, key: str, action: Any) -> None:
        """Run `action` (a coroutine) as a task unless one for `key` still runs; a failed one is
        counted and tried again on a later round (every action here is idempotent)."""
        if key in self.busy:
            action.close()
            return

        def done(task: asyncio.Task) -> None:
            del self.busy[key]
            if not task.cancelled() and task.exception() is not None:
                self.hiccups += 1

        self.busy[key] = asyncio.create_task(action)
        self.busy[key].add_done_callback(done)

    async def drain(self) -> None:
        """Cancel what still runs beside the loop (the run is over)."""
        for task in list(self.busy.values()):
            task.cancel()
        await asyncio.gather(*self.busy.values(), return_exceptions=True)

    async def _releases(self) -> None:
        for run in self.plan.releases:
            status = (self.cluster.get("trainingruns", run) or {}).get("status") or {}
            if run not in self.approved and (status.get("registeredModel") or {}).get("version"):
                self.beside(f"approve/{run}", self._approve_and_release(run))
            rs = self.cluster.get("rayservices", f"rel-{run}")
            if rs is not None:
                want = {
                    "observedGeneration": rs["metadata"]["generation"],
                    "activeServiceStatus": {"applicationStatuses": {"infill": {"status": "RUNNING"}}},
                }
                if {k: (rs.get("status") or {}).get(k) for k in want} != want:
                    await self.cluster.patch("rayservices", f"rel-{run}", {"status": want}, "status")
                version = rs["metadata"]["annotations"][ANNOTATION_VERSION]
                self.endpoints.serve(rs["metadata"]["namespace"], f"rel-{run}-serve-svc", run, version)

    async def _approve_and_release(self, run: str) -> None:
        """The reviewer approves the run's version, then the team applies its ModelRelease."""
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.registry.approve(run, 1))
        if self.cluster.get("modelreleases", f"rel-{run}") is None:  # a timed-out create may have landed
            await self.cluster.create(model_release(run))
        self.approved.add(run)


def _final_status(what: str, job: str) -> dict[str, Any]:
    if what == "succeed":
        return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True", "reason": "Completed"}]}
    if what == "exit78":
        message = f"Container trainer for pod team/{job}-0-x failed with exit code 78 matching FailJob rule at index 0"
        return {
            "failed": 1,
            "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": message}],
        }
    return {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}


def settled(cluster: Cluster, plan: Plan) -> bool:
    for run, script in plan.runs.items():
        status = (cluster.get("trainingruns", run) or {}).get("status") or {}
        if status.get("phase") not in ("Succeeded", "Failed"):
            return False
        if script[-1] == "succeed" and not status.get("registeredModel"):
            return False
    return all(
        ((cluster.get("modelreleases", f"rel-{r}") or {}).get("status") or {}).get("phase") == "Available"
        for r in plan.releases
    )


def verdict(cluster: Cluster, plan: Plan, registry: Any) -> dict[str, Any]:
    """What went wrong, counted: objects created more than once, attempts beyond the script, runs
    with other than one version, resources not in the phase their script implies."""
    creates: Counter = cluster.emulator.creates
    expected = {n: next((p, r) for s, p, r in SCRIPTS if s == script) for n, script in plan.runs.items()}
    wrong_phase, extra_attempts, versions_wrong = [], [], []
    for run, script in plan.runs.items():
        status = (cluster.get("trainingruns", run) or {}).get("status") or {}
        phase, reason = expected[run]
        got = status.get("phase")  # and the reason of its own condition (Failed's reason, say)
        got_reason = next((c["reason"] for c in status.get("conditions", []) if c["type"] == got), None)
        if got != phase or (reason and got_reason != reason):
            wrong_phase.append(f"{run}: {got}/{got_reason} ({status.get('message')}), want {phase}/{reason}")
        attempts = sum(1 for (plural, name) in creates if plural == "jobs" and name.startswith(f"{run}-a"))
        if attempts != len(script):
            extra_attempts.append(f"{run}: {attempts} attempts, script has {len(script)}")
        n = len(registry.versions(run))
        if n != (1 if script[-1] == "succeed" else 0):
            versions_wrong.append(f"{run}: {n} versions")
    for run in plan.releases:
        status = (cluster.get("modelreleases", f"rel-{run}") or {}).get("status") or {}
        if status.get("phase") != "Available" or status.get("stableVersion") != "1":
            wrong_phase.append(f"rel-{run}: {status.get('phase')} stable {status.get('stableVersion')}")
    duplicates = {f"{plural}/{name}": n for (plural, name), n in creates.items() if n > 1}
    return {
        "lifecycles": len(plan.runs) + len(plan.releases),
        "objects_created": sum(creates.values()),
        "objects_created_twice": duplicates,
        "attempts_beyond_script": extra_attempts,
        "runs_with_wrong_version_count": versions_wrong,
        "wrong_final_phase": wrong_phase,
    }


@contextlib.asynccontextmanager
async def killing(
    op: OperatorProcess, rng: random.Random, *, after_ready: tuple[float, float], kills: int
) -> AsyncIterator[list[float]]:
    """Keep the operator running, SIGKILLing it `kills` times (and starting it again at once), each
    time a random moment after it came up: mid-reconcile, not only while it is still importing."""
    done: list[float] = []
    t0 = time.monotonic()

    async def loop() -> None:
        while len(done) < kills:
            await op.wait_ready()
            await asyncio.sleep(rng.uniform(*after_ready))
            op.kill()
            done.append(round(time.monotonic() - t0, 1))
            op.start()

    op.start()
    task = asyncio.create_task(loop())
    try:
        yield done
    finally:
        task.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            op.kill()  # never leave an operator behind, whatever ended the run


class ProgressLog:
    """A line every `every` seconds while the world plays: the phases so far, the slowest world round
    since the last line, and how long MLflow takes to answer one search. A stalled harness (slow
    rounds, MLflow quick) and an overloaded MLflow (both slow) read differently."""

    def __init__(self, world: World, every: float = 30.0, out: Any = None) -> None:
        self.world, self.every, self.out = world, every, out or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.slowest_round = 0.0

    async def tick(self, round_seconds: float) -> None:
        self.slowest_round = max(self.slowest_round, round_seconds)
        if time.monotonic() - self.last < self.every:
            return
        probe_start = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.world.registry.versions, "chaos-probe")
            mlflow = f"{time.monotonic() - probe_start:.2f}s"
        except Exception as exc:  # noqa: BLE001 - a probe that fails is itself the news
            mlflow = f"failed ({type(exc).__name__})"
        cluster = self.world.cluster
        runs = Counter(
            ((cluster.get("trainingruns", n) or {}).get("status") or {}).get("phase") for n in self.world.plan.runs
        )
        releases = Counter(
            ((cluster.get("modelreleases", f"rel-{r}") or {}).get("status") or {}).get("phase")
            for r in self.world.plan.releases
        )
        print(
            f"[chaos {time.monotonic() - self.t0:6.0f}s] runs {dict(runs)} releases {dict(releases)} "
            f"slowest world round {self.slowest_round:.1f}s, {len(self.world.busy)} world actions under way, "
            f"mlflow search {mlflow}, retried {self.world.hiccups}",
            file=self.out,
            flush=True,
        )
        self.last, self.slowest_round = time.monotonic(), 0.0


async def play(
    cluster: Cluster,
    world: World,
    plan: Plan,
    *,
    timeout: float,
    waves: int = 1,
    wave_seconds: float = 2.0,
    kills_done: Callable[[], bool] = lambda: True,
    log: ProgressLog | None = None,
) -> bool:
    """Create the runs in `waves`, `wave_seconds` apart (so kills land in every phase), and play the
    world until everything settled and the kills are over (`kills_done`), or `timeout`; whether it
    settled."""
    names = list(plan.runs)
    per_wave = max(1, -(-len(names) // waves))
    deadline = time.monotonic() + timeout
    created, next_wave = 0, time.monotonic()
    while time.monotonic() < deadline:
        round_start = time.monotonic()
        if created < len(names) and round_start >= next_wave:
            try:
                for name in names[created : created + per_wave]:
                    if cluster.get("trainingruns", name) is None:  # a timed-out create may have landed
                        await cluster.create(training_run(name, plan.runs[name]))
                created, next_wave = created + per_wave, round_start + wave_seconds
            except (TimeoutError, aiohttp.ClientError):
                world.hiccups += 1
        try:
            await world.step()
        except (TimeoutError, aiohttp.ClientError):  # a loaded machine: the world tries again next round
            world.hiccups += 1
        if created >= len(names) and settled(cluster, plan) and kills_done():
            await world.drain()
            return True
        if log is not None:
            await log.tick(time.monotonic() - round_start)
        await asyncio.sleep(0.3)
    await world.drain()
    return False
