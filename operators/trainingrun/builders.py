"""Pure builders: a TrainingRun (+ attempt number + operator settings) -> the objects of one attempt.

Per attempt N the operator creates a ConfigMap `<run>-a<N>` (the run's YAML, read by the trainer), the
headless Service `<run>` (stable DNS for the gang; shared by all attempts) and the Indexed Job
`<run>-a<N>` whose pods run `torchrun -m trainer`. No client, no I/O: `midfill render` prints exactly
these dicts, and the handlers create them.
"""

from __future__ import annotations

from typing import Any

import yaml

from midfill.api import API_VERSION, TrainingRun
from midfill.api.trainingrun import DEFAULT_TRAINER_IMAGE
from operators.settings import OperatorSettings

LABEL_RUN = "midfill.dev/training-run"
LABEL_ATTEMPT = "midfill.dev/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "midfill-operator"}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
CONTAINER = "trainer"
LAUNCHER = "trainer.launch"  # `python -m trainer.launch TORCHRUN-ARGS` (keeps the exit code 78)
CHECK_CONTAINER = "check-config"  # init container: `python -m trainer --check` (exit 78 = invalid config)
CONFIG_DIR = "/etc/midfill"
RUN_FILE = "trainingrun.yaml"
WORK_DIR = "/var/midfill"
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def job_name(run_name: str, attempt: int) -> str:
    """Fixed child name of an attempt (idempotent creation: a retry finds the same name)."""
    return f"{run_name}-a{attempt}"


def run_uid(run: TrainingRun) -> str:
    return run.metadata.uid or PLACEHOLDER_UID


def owner_reference(run: TrainingRun) -> dict[str, Any]:
    """Makes the TrainingRun the controller of a child, so the cluster's GC deletes it with the run."""
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRun",
        "name": run.metadata.name,
        "uid": run_uid(run),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(run: TrainingRun, attempt: int | None = None) -> dict[str, str]:
    out = {**MANAGED_BY, LABEL_RUN: run.metadata.name}
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    return out


def _meta(
    run: TrainingRun, name: str, attempt: int | None, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {**labels(run, attempt), **(extra_labels or {})},
        "ownerReferences": [owner_reference(run)],
    }
    if run.metadata.namespace:
        meta["namespace"] = run.metadata.namespace
    return meta


def build_config_map(run: TrainingRun, *, attempt: int) -> dict[str, Any]:
    """The run's YAML as the trainer reads it (immutable: a spec edit reaches the next attempt only)."""
    meta = {
        k: v
        for k, v in {
            "name": run.metadata.name,
            "namespace": run.metadata.namespace,
            "uid": run.metadata.uid,
            "generation": run.metadata.generation,
            "labels": run.metadata.labels or None,
        }.items()
        if v is not None
    }
    doc = {"apiVersion": API_VERSION, "kind": "TrainingRun", "metadata": meta, "spec": run.spec.to_wire()}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(run, job_name(run.metadata.name, attempt), attempt),
        "immutable": True,
        "data": {RUN_FILE: yaml.safe_dump(doc, sort_keys=False)},
    }


def build_service(run: TrainingRun, *, settings: OperatorSettings) -> dict[str, Any]:
    """Headless Service `<run>`: pods get DNS names `<job>-<index>.<run>` before they are ready
    (publishNotReadyAddresses), which the rendezvous needs."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, run.metadata.name, None),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: run.metadata.name},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": settings.master_port,
                    "targetPort": settings.master_port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def checkpoint_dir(run: TrainingRun, settings: OperatorSettings) -> str | None:
    """MIDFILL_CHECKPOINT_DIR for the pods: the same folder for every attempt, so each one resumes."""
    if run.spec.checkpoint.uri:
        return None  # the trainer uses spec.checkpoint.uri itself
    if settings.checkpoint_claim_name:
        return f"{settings.checkpoint_mount_path.rstrip('/')}/{run.metadata.namespace or 'default'}/{run.metadata.name}"
    return f"{WORK_DIR}/checkpoints"  # pod-local: lost with the pod (documented in docs/operator.md)


def shared_storage_problem(run: TrainingRun, settings: OperatorSettings) -> str | None:
    """Why a multi-node run cannot work here, or None. Every node must see one checkpoint folder: rank 0
    writes the tokenizer and checkpoints there and the other ranks read them (a pod-local folder makes
    rank 1 fail on a tokenizer it cannot see, and every restart fails the same way)."""
    nodes = run.spec.parallelism.num_nodes
    if nodes <= 1:
        return None
    uri = run.spec.checkpoint.uri
    if uri:
        path = uri.removeprefix("file://")
        if "://" in path or run.spec.pod_template.mounts_path(path):
            return None  # object storage, or a folder on a volume the template mounts
        where = f"checkpoint.uri {uri!r} is a path in each pod's own filesystem"
    elif settings.checkpoint_claim_name:
        return None
    else:
        where = "no checkpoint.uri is set and the operator has no checkpoint claim (MIDFILL_CHECKPOINT_CLAIM_NAME)"
    return (
        f"{nodes} nodes need one checkpoint folder they all see, but {where}; set spec.checkpoint.uri to object "
        "storage (s3://bucket/checkpoints/run), or mount a shared (ReadWriteMany) volume with "
        "spec.podTemplate.volumes/volumeMounts and point spec.checkpoint.uri into it, or install the operator "
        "with checkpoints.claimName"
    )


def _env(run: TrainingRun, *, attempt: int, settings: OperatorSettings) -> list[dict[str, Any]]:
    name = job_name(run.metadata.name, attempt)
    par = run.spec.parallelism
    env: list[dict[str, Any]] = [
        {"name": "PET_NNODES", "value": str(par.num_nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(par.nproc_per_node)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-0.{run.metadata.name}"},
        {"name": "PET_MASTER_PORT", "value": str(settings.master_port)},
        {"name": "PET_RDZV_ID", "value": f"{run_uid(run)}-a{attempt}"},
        # Whole-gang restarts are the operator's (each a new attempt that resumes), not torchrun's.
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        {"name": "MIDFILL_RUN_UID", "value": run_uid(run)},
        {"name": "MIDFILL_ATTEMPT", "value": str(attempt)},
        {"name": "MIDFILL_STATE_DIR", "value": WORK_DIR},
        {"name": "MIDFILL_PROGRESS_BAR", "value": "false"},
    ]
    if settings.tracking_uri:
        env.append({"name": "MIDFILL_TRACKING_URI", "value": settings.tracking_uri})
    if settings.tracking_secret:  # the trainers' MLflow credentials (the chart's mlflow.auth.trainerSecret)
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": settings.tracking_secret, "key": key}}})
    ckpt = checkpoint_dir(run, settings)
    if ckpt:
        env.append({"name": "MIDFILL_CHECKPOINT_DIR", "value": ckpt})
    return env


def build_job(
    run: TrainingRun, *, attempt: int, settings: OperatorSettings, active_deadline_seconds: int | None = None
) -> dict[str, Any]:
    """The Indexed Job of one attempt: one pod per node, all-or-nothing (backoffLimit 0)."""
    spec = run.spec
    name = job_name(run.metadata.name, attempt)
    nodes = spec.parallelism.num_nodes
    queue = spec.scheduling.queue_name
    image = settings.trainer_image if spec.image == DEFAULT_TRAINER_IMAGE else spec.image
    container = _trainer_container(run, attempt=attempt, settings=settings, image=image)
    volumes = _volumes(name)
    if settings.checkpoint_claim_name and not spec.checkpoint.uri:
        container["volumeMounts"].append({"name": "checkpoints", "mountPath": settings.checkpoint_mount_path})
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": settings.checkpoint_claim_name}})
    check = _check_container(container, image=image)
    pod_spec = _pod_spec(run, containers=[container], init_containers=[check], volumes=volumes)
    pod_meta: dict[str, Any] = {"labels": labels(run, attempt)}
    spec.pod_template.apply(pod_spec, pod_meta, containers=[check, container])
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": _pod_failure_rules(run)},
        # Kueue admits the whole gang at once by un-suspending the Job (no half-scheduled gangs).
        "suspend": bool(queue),
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(run, name, attempt, {QUEUE_LABEL: queue} if queue else None),
        "spec": job_spec,
    }


def _trainer_container(run: TrainingRun, *, attempt: int, settings: OperatorSettings, image: str) -> dict[str, Any]:
    """The container that runs torchrun (through trainer.launch) on one node."""
    resources = {k: v for k, v in run.spec.resources.to_wire().items() if v}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        # trainer.launch runs torchrun and turns its 1 back into the trainer's 78 when a worker found
        # an invalid config (torchrun itself exits 1 whatever its worker's code): see trainer/launch.py.
        "command": ["python", "-m", LAUNCHER],
        "args": [
            "-m",
            "trainer",
            "--run-file",
            f"{CONFIG_DIR}/{RUN_FILE}",
            "--uid",
            run_uid(run),
            "--attempt",
            str(attempt),
        ],
        "env": _env(run, attempt=attempt, settings=settings),
        "ports": [{"name": "rendezvous", "containerPort": settings.master_port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "work", "mountPath": WORK_DIR},
        ],
    }
    if resources:
        container["resources"] = resources
    return container


def _volumes(name: str) -> list[dict[str, Any]]:
    return [
        {"name": "config", "configMap": {"name": name}},
        # NCCL and the data loader workers exchange tensors through /dev/shm; the default 64 Mi is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "work", "emptyDir": {}},
    ]


def _check_container(trainer: dict[str, Any], *, image: str) -> dict[str, Any]:
    """The checks that need no model run first, once per pod and without torchrun, in an init container
    (a 78 there never costs a rendezvous); the launcher covers what only the workers can find."""
    return {
        "name": CHECK_CONTAINER,
        "image": image,
        "command": ["python"],
        "args": ["-m", "trainer", "--check", "--run-file", f"{CONFIG_DIR}/{RUN_FILE}"],
        "env": trainer["env"],
        "volumeMounts": [m for m in trainer["volumeMounts"] if m["name"] != "dshm"],
    }


def _pod_spec(
    run: TrainingRun,
    *,
    containers: list[dict[str, Any]],
    init_containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """The trainer pod's spec: the headless Service's subdomain, the node pool, the priority class."""
    pod_spec: dict[str, Any] = {
        "subdomain": run.metadata.name,
        "restartPolicy": "Never",
        "initContainers": init_containers,
        "containers": containers,
        "volumes": volumes,
    }
    pool = run.spec.node_pool
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in pool.tolerations]
    if pool.affinity:
        pod_spec["affinity"] = pool.affinity
    if run.spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = run.spec.scheduling.priority_class_name
    return pod_spec


def _pod_failure_rules(run: TrainingRun) -> list[dict[str, Any]]:
    """Non-retryable exit codes fail the Job at once; a disruption (preemption, eviction) is not a failure."""
    rules: list[dict[str, Any]] = []
    # Exit code 0 may not appear in an In rule; a zero exit is a success anyway.
    codes = sorted({c for c in run.spec.failure_policy.non_retryable_exit_codes if c != 0})
    if codes:
        for container_name in (CHECK_CONTAINER, CONTAINER):
            rules.append(
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": container_name, "operator": "In", "values": codes},
                }
            )
    # A preempted or evicted pod is not the trainer's fault: do not count it as a failure.
    rules.append({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]})
    return rules


def build_attempt(
    run: TrainingRun, *, attempt: int, settings: OperatorSettings, active_deadline_seconds: int | None = None
) -> list[dict[str, Any]]:
    """Everything one attempt needs, in creation order (the Job last: its pods mount the others)."""
    return [
        build_config_map(run, attempt=attempt),
        build_service(run, settings=settings),
        build_job(run, attempt=attempt, settings=settings, active_deadline_seconds=active_deadline_seconds),
    ]
