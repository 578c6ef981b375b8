"""The rendered trainer pod, run as rendered: its init container's `--check` and its container's
`python -m trainer.launch` (torchrun + the trainer), with the env and args of `build_job` verbatim.

Only what the pod's volumes provide is moved into tmp_path (the config mount, the work emptyDir,
the checkpoint folder), and PET_NODE_RANK, which the downward API fills, is set to the index 0.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import tiny_run

from midfill.api import EXIT_CODE_INVALID_CONFIG, parse_resource
from operators.settings import OperatorSettings
from operators.trainingrun import builders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pod(doc: dict, tmp_path: Path) -> tuple[dict, dict]:
    doc = {**doc, "metadata": {**doc["metadata"], "namespace": "team", "uid": "uid-launch"}}
    run = parse_resource(doc)
    settings = OperatorSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", master_port=_free_port())
    job = builders.build_job(run, attempt=1, settings=settings)
    config = tmp_path / "etc-midfill"
    config.mkdir()
    (config / builders.RUN_FILE).write_text(builders.build_config_map(run, attempt=1)["data"][builders.RUN_FILE])
    spec = job["spec"]["template"]["spec"]
    return spec["initContainers"][0], spec["containers"][0]


def _run(container: dict, tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    """Run a rendered container here: its command, args and env; mounts mapped into tmp_path."""
    mounts = {builders.CONFIG_DIR: str(tmp_path / "etc-midfill"), builders.WORK_DIR: str(tmp_path / "work")}

    def local(value: str) -> str:
        for pod_path, here in mounts.items():
            value = value.replace(pod_path, here)
        return value

    env = {e["name"]: local(e["value"]) for e in container["env"] if "value" in e}
    env["PET_NODE_RANK"] = "0"  # the downward API's job-completion-index of the first pod
    env["PET_MASTER_ADDR"] = "127.0.0.1"  # the headless Service's DNS name for index 0
    env.update(env_overrides)
    bin_dir = str(Path(sys.executable).parent)
    command = [sys.executable if c == "python" else c for c in container["command"]]
    return subprocess.run(
        [*command, *(local(a) for a in container["args"])],
        env={**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_a_config_error_found_by_the_workers_exits_78_through_torchrun(tmp_path):
    """`--check` cannot see it (it builds no model); the worker does, and torchrun would say 1."""
    doc = tiny_run("launch", steps=2)
    # Asked for a GPU and FlashAttention; this machine has neither: a ConfigError in the worker only.
    doc["spec"]["model"]["attention"] = "flash_attention_2"
    doc["spec"]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    check, trainer = _pod(doc, tmp_path)
    assert _run(check, tmp_path).returncode == 0
    done = _run(trainer, tmp_path)
    assert done.returncode == EXIT_CODE_INVALID_CONFIG, done.stdout[-2000:] + done.stderr[-3000:]
    assert "invalid config: model.attention" in done.stdout + done.stderr
    # The Job's podFailurePolicy turns that exit code of this container into FailJob (not retried).
    rules = [
        r
        for r in builders.build_job(parse_resource(doc), attempt=1, settings=OperatorSettings())["spec"][
            "podFailurePolicy"
        ]["rules"]
        if r["action"] == "FailJob"
    ]
    assert {"containerName": trainer["name"], "operator": "In", "values": [EXIT_CODE_INVALID_CONFIG]} in [
        r["onExitCodes"] for r in rules
    ]


def test_check_refuses_an_unwritable_checkpoint_folder(tmp_path):
    doc = tiny_run("unwritable")
    check, _ = _pod(doc, tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint mount should be")
    done = _run(check, tmp_path, MIDFILL_CHECKPOINT_DIR=str(blocker / "team" / "unwritable"))
    assert done.returncode == EXIT_CODE_INVALID_CONFIG, done.stderr[-2000:]
    assert "invalid config: the checkpoint folder (MIDFILL_CHECKPOINT_DIR" in done.stderr
    assert "not writable" in done.stderr
