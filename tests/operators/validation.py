"""Schema checks of built objects: kubernetes-validate (strict) for built-in kinds, and a minimal
schema of our own for KubeRay's RayService (a CRD kubernetes-validate cannot know), whose head and
worker pod templates are checked strictly as Pods."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import yaml

# The lowest and highest Kubernetes minors we support (charts/midfill/Chart.yaml: kubeVersion >= 1.30).
K8S_VERSIONS = ("1.30.0", "1.35.0")

_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "resources": {"type": "object"},
        "env": {"type": "array"},
        "volumeMounts": {"type": "array"},
        "ports": {"type": "array"},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
# The fields of ray.io/v1 RayService the operator writes (KubeRay v1.2+ CRD), with their types.
RAYSERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                                "template": _POD_TEMPLATE,
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "rayStartParams", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer"},
                                    "minReplicas": {"type": "integer"},
                                    "maxReplicas": {"type": "integer"},
                                    "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate(obj: dict[str, Any]) -> None:
    """Raise if `obj` is not valid for every supported Kubernetes version."""
    if obj["kind"] == "RayService":
        jsonschema.validate(obj, RAYSERVICE_SCHEMA)
        # The Serve config is YAML inside a string: it must parse and name our app.
        config = yaml.safe_load(obj["spec"]["serveConfigV2"])
        assert config["applications"][0]["import_path"] == "serving.app:build_app"
        # KubeRay copies each group's template into Pods: check them as strictly as a built-in kind.
        cluster = obj["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            meta = {"name": "ray-pod", **group["template"].get("metadata", {})}
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": group["template"]["spec"]}
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(pod, version, strict=True)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)
