"""Generate the CustomResourceDefinitions from the pydantic models in midfill.api.

The pydantic models are the single source of truth; `make crds` (or `midfill crds --out DIR`)
writes manifests/crds/, and a test fails when the committed files differ from a fresh generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from midfill.api import GROUP, VERSION, ModelRelease, TrainingRun

# Per kind: plural, short names, printer columns (what `kubectl get tr` shows).
_KINDS: dict[str, dict[str, Any]] = {
    "TrainingRun": {
        "model": TrainingRun,
        "plural": "trainingruns",
        "short": ["tr"],
        "columns": [
            ("Phase", "string", ".status.phase"),
            ("Nodes", "integer", ".spec.parallelism.numNodes"),
            ("Step", "integer", ".status.progress.step"),
            ("Loss", "number", ".status.progress.loss"),
            ("MFU", "number", ".status.progress.mfu"),
            ("Model version", "string", ".status.registeredModel.version"),
        ],
    },
    "ModelRelease": {
        "model": ModelRelease,
        "plural": "modelreleases",
        "short": ["mr"],
        "columns": [
            ("Phase", "string", ".status.phase"),
            ("Model", "string", ".spec.model.registeredModelName"),
            ("Version", "string", ".status.stableVersion"),
            ("URL", "string", ".status.url"),
        ],
    },
}

# JSON Schema keywords a structural CRD schema may carry (others, like title, are dropped).
_KEEP = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "additionalProperties",
    "format",
    "nullable",
}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return schema


def _to_openapi(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-Schema node to an OpenAPI v3 structural-schema node."""
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        options = [_resolve(o, defs) for o in schema["anyOf"]]
        non_null = [o for o in options if o.get("type") != "null"]
        outer = {k: v for k, v in schema.items() if k != "anyOf"}
        if {o.get("type") for o in non_null} == {"integer", "string"}:
            out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
            out.update({k: v for k, v in outer.items() if k in ("description",)})
            return out
        if {o.get("type") for o in non_null} == {"boolean", "string"}:
            # true/false or a keyword (training.compile: auto); the models validate the value.
            out = {"x-kubernetes-preserve-unknown-fields": True}
            out.update({k: v for k, v in outer.items() if k in ("description", "default")})
            return out
        assert len(non_null) == 1, f"unsupported union in CRD schema: {schema}"
        out = _to_openapi({**non_null[0], **outer}, defs)
        if outer.get("default", "unset") is None:
            out.pop("default", None)
        if len(non_null) < len(options):
            out["nullable"] = True  # optional fields may be written as null
        return out
    if "const" in schema:
        schema = {**schema, "enum": [schema.pop("const")]}
    out = {}
    kind = schema.get("type")
    if kind == "object":
        out["type"] = "object"
        props = schema.get("properties")
        if props:
            out["properties"] = {name: _to_openapi(sub, defs) for name, sub in props.items()}
            if schema.get("required"):
                out["required"] = list(schema["required"])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _to_openapi(extra, defs)
        elif not props:
            # A free-form object (e.g. affinity) passes through as written.
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["type"] = "array"
        out["items"] = _to_openapi(schema.get("items", {}), defs)
    elif kind is not None:
        out["type"] = kind
    for key, value in schema.items():
        if key in ("type", "properties", "required", "items", "additionalProperties"):
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key in _KEEP:
            out[key] = value
    if "default" in out and isinstance(out["default"], (dict, list)):
        out.pop("default")  # object defaults are applied by the models; keep the CRD readable
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a resource's spec and status."""
    full = model.model_json_schema(by_alias=True, mode="validation")
    defs = full.get("$defs", {})
    props = full["properties"]
    return {
        "type": "object",
        "description": (model.__doc__ or "").strip().splitlines()[0],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _to_openapi(props["spec"], defs),
            "status": _to_openapi(props["status"], defs),
        },
        "required": ["spec"],
    }


def build_crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition object for one kind."""
    info = _KINDS[kind]
    columns = [{"name": name, "type": typ, "jsonPath": path} for name, typ, path in info["columns"]] + [
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info['plural']}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": info["plural"],
                "singular": kind.lower(),
                "shortNames": info["short"],
                "categories": ["midfill"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": openapi_schema(info["model"])},
                }
            ],
        },
    }


def render_crds() -> dict[str, str]:
    """File name -> YAML text for every CRD (deterministic, byte for byte)."""
    header = "# Generated by `make crds` from platform/midfill/api; do not edit by hand.\n"
    return {
        f"{GROUP}_{info['plural']}.yaml": header
        + yaml.safe_dump(build_crd(kind), sort_keys=False, width=100, allow_unicode=True)
        for kind, info in _KINDS.items()
    }


def write_crds(out_dir: str | Path) -> list[Path]:
    """Write every CRD into out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written


def to_json_schema(node: Any) -> Any:
    """An openAPIV3Schema node as plain JSON Schema (to validate documents like the API server).

    Handles the Kubernetes extensions: nullable, x-kubernetes-int-or-string,
    x-kubernetes-preserve-unknown-fields; structural objects reject unknown fields (pruning).
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = to_json_schema(value)
        elif key == "x-kubernetes-int-or-string":
            out["type"] = ["integer", "string"]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and value is True:
            # OpenAPI 3.0 marks the bound exclusive; JSON Schema puts the number here instead.
            out[key] = node["minimum" if key == "exclusiveMinimum" else "maximum"]
        elif not key.startswith("x-kubernetes") and key != "nullable":
            out[key] = value
    if node.get("exclusiveMinimum") is True:
        out.pop("minimum", None)
    if node.get("exclusiveMaximum") is True:
        out.pop("maximum", None)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if out.get("type") == "object" and "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def crd_json_schema(crd: dict[str, Any], version: str = VERSION) -> dict[str, Any]:
    """The JSON Schema of one version of a CRD object."""
    for ver in crd["spec"]["versions"]:
        if ver["name"] == version:
            return to_json_schema(ver["schema"]["openAPIV3Schema"])
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")
