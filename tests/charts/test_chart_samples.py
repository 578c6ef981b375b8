"""Every sample CR in manifests/samples/ is accepted by the chart's CRDs, judged the way the API
server does: each CRD's openAPIV3Schema, converted to JSON Schema, applied with unknown fields
rejected (kubectl's default --validate=strict)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chartutil import CHART, REPO_ROOT

SAMPLES = sorted((REPO_ROOT / "manifests" / "samples").glob("*.yaml"))


def openapi_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """Convert a structural OpenAPI v3 (CRD) schema node to JSON Schema (draft 2020-12).

    - `nullable: true` adds null to the allowed types;
    - `x-kubernetes-int-or-string` becomes integer-or-string;
    - `x-kubernetes-preserve-unknown-fields` keeps an object open; every other object with declared
      properties is closed (additionalProperties: false), as strict field validation is;
    - OpenAPI 3.0's boolean exclusiveMinimum/Maximum become the numeric keywords.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = openapi_to_jsonschema(value)
        elif key == "additionalProperties":
            out["additionalProperties"] = openapi_to_jsonschema(value) if isinstance(value, dict) else value
        elif key in (
            "nullable",
            "x-kubernetes-int-or-string",
            "x-kubernetes-preserve-unknown-fields",
            "exclusiveMinimum",
            "exclusiveMaximum",
        ) or key.startswith("x-kubernetes-"):
            continue  # handled below
        else:
            out[key] = copy.deepcopy(value)
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True:
            out[bound] = out.pop(limit)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if node.get("nullable"):
        if "anyOf" in out:
            out["anyOf"].append({"type": "null"})
        elif "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> JSON Schema, for every served version of every chart CRD."""
    schemas = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            if version["served"]:
                api_version = f"{spec['group']}/{version['name']}"
                schemas[(api_version, spec["names"]["kind"])] = openapi_to_jsonschema(
                    version["schema"]["openAPIV3Schema"]
                )
    return schemas


SCHEMAS = _crd_schemas()


def _errors(doc: dict[str, Any]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in SCHEMAS, f"no chart CRD serves {key}; served: {sorted(SCHEMAS)}"
    validator = jsonschema.Draft202012Validator(SCHEMAS[key])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_are_samples_and_crds() -> None:
    assert SAMPLES and len(SCHEMAS) >= 2


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_sample_is_accepted_by_the_crd(sample: Path) -> None:
    docs = _docs(sample)
    assert docs, f"{sample} holds no documents"
    for doc in docs:
        errors = _errors(doc)
        assert not errors, f"{sample.name} {doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


def _sample(name: str) -> dict[str, Any]:
    return _docs(REPO_ROOT / "manifests" / "samples" / name)[0]


def test_the_conversion_rejects_what_the_api_server_rejects() -> None:
    run = _sample("trainingrun-7b-flash.yaml")
    bad = copy.deepcopy(run)
    bad["spec"]["training"]["learningRat"] = 0.001  # a typo: unknown field
    assert any("learningRat" in e for e in _errors(bad))
    bad = copy.deepcopy(run)
    bad["spec"]["parallelism"]["numNodes"] = "four"
    assert any("numNodes" in e for e in _errors(bad))
    bad = copy.deepcopy(run)
    bad["spec"]["model"]["attention"] = "xformers"
    assert any("attention" in e for e in _errors(bad))


def test_the_conversion_accepts_what_the_api_server_accepts() -> None:
    run = _sample("trainingrun-7b-flash.yaml")
    # Resource quantities are int-or-string; metadata stays open; status may be null (nullable).
    run["spec"]["resources"]["limits"]["nvidia.com/gpu"] = "8"
    run["metadata"]["labels"] = {"team": "code-assist"}
    run["status"] = None
    assert _errors(run) == []


def test_openapi_conversion_rules() -> None:
    schema = openapi_to_jsonschema(
        {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "nullable": True},
                "q": {"x-kubernetes-int-or-string": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    )
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"n": None, "q": "1Gi", "free": {"anything": [1]}})
    assert validator.is_valid({"q": 3})
    assert not validator.is_valid({"n": 0})
    assert not validator.is_valid({"q": 1.5})
    assert not validator.is_valid({"other": 1})
