"""The committed CRDs are exactly what midfill.api generates today."""

from __future__ import annotations

from pathlib import Path

from midfill.cli import main
from midfill.crds import build_crd, render_crds


def test_committed_crds_match_a_fresh_generation(repo_root: Path) -> None:
    committed = {p.name: p.read_text() for p in (repo_root / "manifests/crds").glob("*.yaml")}
    assert committed == render_crds(), "manifests/crds/ is stale: run `make crds` and commit the result"


def test_cli_reproduces_the_committed_crds_byte_for_byte(repo_root: Path, tmp_path: Path) -> None:
    try:
        main(["crds", "--out", str(tmp_path)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    for path in (repo_root / "manifests/crds").glob("*.yaml"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()


def test_crd_shape_for_kubectl() -> None:
    tr = build_crd("TrainingRun")
    version = tr["spec"]["versions"][0]
    assert tr["spec"]["scope"] == "Namespaced" and tr["spec"]["names"]["shortNames"] == ["tr"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Nodes", "Step", "Loss", "MFU", "Model version", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    parallelism = spec["properties"]["parallelism"]["properties"]
    assert parallelism["numNodes"]["minimum"] == 1 and parallelism["numNodes"]["default"] == 1
    assert parallelism["strategy"]["enum"] == ["ddp", "fsdp"]
    assert "data" in spec["required"] and "training" in spec["required"]
    mr = build_crd("ModelRelease")
    assert mr["spec"]["names"]["shortNames"] == ["mr"]
    assert [c["name"] for c in mr["spec"]["versions"][0]["additionalPrinterColumns"]] == [
        "Phase",
        "Model",
        "Version",
        "URL",
        "Age",
    ]


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string / preserve-unknown), as the API server requires."""

    def walk(node: dict, path: str) -> None:
        untyped_ok = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or untyped_ok, path
        assert "$ref" not in node and "anyOf" not in node, path
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    for kind in ("TrainingRun", "ModelRelease"):
        walk(build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"], kind)
