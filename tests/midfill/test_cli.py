"""The core CLI: version, crds, validate (exit codes and one readable line per invalid field)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

MIDFILL = [sys.executable, "-c", "from midfill.cli import main; main()"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MIDFILL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_version() -> None:
    out = run("version")
    assert out.returncode == 0 and out.stdout.startswith("midfill ")


def test_validate_accepts_the_7b_sample(repo_root: Path) -> None:
    out = run("validate", "-f", str(repo_root / "manifests/samples/trainingrun-7b-flash.yaml"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{repo_root}/manifests/samples/trainingrun-7b-flash.yaml: valid (TrainingRun/fim-7b)")
    # ...with its memory per GPU against the pool's H100s (80 GiB, from the GKE accelerator label)
    assert "memory estimate (fsdp over 32 processes" in out.stdout
    assert "GPU memory            80 GiB (nodePool.nodeSelector cloud.google.com/gke-accelerator)" in out.stdout
    assert "warning" not in out.stderr


def test_validate_warns_when_a_run_will_not_fit_its_gpus(repo_root: Path, tmp_path: Path) -> None:
    doc = yaml.safe_load((repo_root / "manifests/samples/trainingrun-7b-flash.yaml").read_text())
    doc["spec"]["parallelism"]["strategy"] = "ddp"  # every GPU holds the whole 7B model and its AdamW state
    doc["spec"]["resources"]["limits"]["memory"] = "16Gi"
    out = run("validate", "-f", str(_write(tmp_path, doc)))
    assert out.returncode == 0, out.stderr  # a warning, not a refusal: the estimate may be off
    assert "exceeds the node pool's 80 GiB; try parallelism.strategy: fsdp" in out.stderr
    assert "raise resources.limits.memory" in out.stderr
    fits = run(
        "validate", "-f", str(repo_root / "manifests/samples/trainingrun-7b-flash.yaml"), "--gpu-memory-gb", "40"
    )
    assert "exceeds the node pool's 40 GiB; try training.activationCheckpointing: full" in fits.stderr


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_rejects_with_field_paths(repo_root: Path, tmp_path: Path) -> None:
    tr = yaml.safe_load((repo_root / "manifests/samples/trainingrun-debug.yaml").read_text())
    mr = yaml.safe_load((repo_root / "manifests/samples/modelrelease.yaml").read_text())

    tr["spec"]["parallelism"]["numNodes"] = 0
    out = run("validate", "-f", str(_write(tmp_path, tr)))
    assert out.returncode == 1 and "spec.parallelism.numNodes:" in out.stderr

    tr["spec"]["parallelism"]["numNodes"] = 1
    tr["spec"]["training"]["learningRat"] = 0.1
    out = run("validate", "-f", str(_write(tmp_path, tr)))
    assert out.returncode == 1 and "spec.training.learningRat: unknown field" in out.stderr
    assert "learningRate" in out.stderr

    mr["spec"]["model"]["version"] = 2
    out = run("validate", "-f", str(_write(tmp_path, mr)))
    assert out.returncode == 1 and "spec.model.version:" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # one line per invalid field


def test_validate_missing_file_is_a_clean_error(tmp_path: Path) -> None:
    out = run("validate", "-f", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_stdlib_platform_is_not_shadowed(repo_root: Path) -> None:
    """platform/ is a source root, not a package: `import platform` from the repo root is the stdlib."""
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}
    assert not (repo_root / "platform" / "__init__.py").exists()
