"""midfill.api.pods: spec.podTemplate / spec.endpoint.podTemplate refuse what the platform owns, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midfill.api import SpecError, parse_resource

ROOT = Path(__file__).resolve().parents[2]


def _run_with(template: dict) -> dict:
    doc = yaml.safe_load((ROOT / "manifests/samples/trainingrun-debug.yaml").read_text())
    doc["spec"]["podTemplate"] = template
    return doc


def _errors(doc: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_resource(doc)
    return str(info.value)


@pytest.mark.parametrize(
    ("template", "field", "hint"),
    [
        (
            {"env": [{"name": "MIDFILL_CHECKPOINT_DIR", "value": "/x"}]},
            "spec.podTemplate.env[0].name",
            "set by midfill",
        ),
        ({"env": [{"name": "PET_NNODES", "value": "9"}]}, "spec.podTemplate.env[0].name", "torchrun"),
        (
            {"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            "spec.podTemplate.env[0]",
            "keep one",
        ),
        ({"envFrom": [{"secretRef": {"name": "s3"}, "prefix": "PET_"}]}, "spec.podTemplate.envFrom[0]", "prefix"),
        ({"envFrom": [{}]}, "spec.podTemplate.envFrom[0]", "exactly one of secretRef and configMapRef"),
        ({"volumes": [{"name": "work", "emptyDir": {}}]}, "spec.podTemplate.volumes[0].name", "midfill adds itself"),
        ({"volumes": [{"name": "data"}]}, "spec.podTemplate.volumes[0]", "exactly one source"),
        (
            {
                "volumes": [{"name": "data", "emptyDir": {}}],
                "volumeMounts": [{"name": "data", "mountPath": "/etc/midfill/x"}],
            },
            "spec.podTemplate.volumeMounts[0].mountPath",
            "mount elsewhere",
        ),
        (
            {"volumes": [{"name": "data", "emptyDir": {}}], "volumeMounts": [{"name": "data", "mountPath": "/var"}]},
            "spec.podTemplate.volumeMounts[0].mountPath",
            "/var/midfill",
        ),
        (
            {"volumeMounts": [{"name": "nowhere", "mountPath": "/data"}]},
            "spec.podTemplate",
            "not in podTemplate.volumes",
        ),
        ({"labels": {"midfill.dev/attempt": "9"}}, "spec.podTemplate.labels", "use another key"),
        ({"serviceAccountName": "Not_A_Name"}, "spec.podTemplate.serviceAccountName", "ServiceAccount"),
    ],
)
def test_template_refuses_what_the_platform_owns(template, field, hint):
    message = _errors(_run_with(template))
    assert field in message and hint in message, message


def test_release_template_is_validated_at_its_own_path():
    doc = yaml.safe_load((ROOT / "manifests/samples/modelrelease.yaml").read_text())
    doc["spec"]["endpoint"]["podTemplate"] = {"volumes": [{"name": "api-keys", "secret": {"secretName": "x"}}]}
    message = _errors(doc)
    assert "spec.endpoint.podTemplate.volumes[0].name" in message and "api-keys" in message


def test_a_full_template_round_trips_in_wire_form():
    template = {
        "serviceAccountName": "fim-trainer",
        "env": [
            {"name": "AWS_REGION", "value": "us-east-1"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}},
        ],
        "envFrom": [{"secretRef": {"name": "s3-credentials"}}, {"configMapRef": {"name": "cfg", "optional": True}}],
        "imagePullSecrets": [{"name": "registry"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
        "labels": {"team": "a"},
        "annotations": {"note": "b"},
        "securityContext": {"fsGroup": 1000},
        "containerSecurityContext": {"allowPrivilegeEscalation": False},
    }
    run = parse_resource(_run_with(template))
    assert run.spec.to_wire()["podTemplate"] == template
