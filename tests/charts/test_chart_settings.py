"""The operator Deployment's environment is read by the operator's own settings class: every
MIDFILL_* variable the chart sets is a real setting, parses, and means what the values say."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartutil import CHART, CI_VALUES, REPO_ROOT, container_env, one

from midfill.api.modelrelease import DEFAULT_SERVING_IMAGE
from midfill.api.trainingrun import DEFAULT_TRAINER_IMAGE
from operators.settings import OperatorSettings

PREFIX = "MIDFILL_"


def _operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", "midfill")["spec"]["template"]["spec"]["containers"][0]


def _settings_from(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    import os

    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(PREFIX) and isinstance(value, str):
            monkeypatch.setenv(name, value)
    return OperatorSettings()


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_every_midfill_variable_is_an_operator_setting(
    render: Any, values_file: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = _operator_container(render(values_file))
    env = container_env(container)
    fields = set(OperatorSettings.model_fields)
    unknown = [n for n in env if n.startswith(PREFIX) and n.removeprefix(PREFIX).lower() not in fields]
    assert not unknown, f"the chart sets variables OperatorSettings does not read: {unknown}"
    settings = _settings_from(env, monkeypatch)  # raises if any value does not parse
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file is not None:
        values.update(yaml.safe_load(values_file.read_text()))
    assert settings.namespaces() == values["watchNamespaces"]
    assert settings.tracking_uri
    assert settings.health_port == container["ports"][0]["containerPort"]
    assert settings.watch_client_timeout > settings.watch_server_timeout


def test_defaults_give_the_images_the_api_defaults_name(render: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(container_env(_operator_container(render())), monkeypatch)
    assert settings.trainer_image == DEFAULT_TRAINER_IMAGE
    assert settings.serving_image == DEFAULT_SERVING_IMAGE
    assert settings.checkpoint_claim_name is None


def test_image_and_checkpoint_values_reach_the_operator(render: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(
        set_values=(
            "trainer.image.repository=registry.example.com/fim/trainer",
            "trainer.image.tag=2024.1",
            "serving.image.tag=0.1.1",
            "operator.checkpoints.claimName=team-checkpoints",
            "operator.standalone=true",
        )
    )
    settings = _settings_from(container_env(_operator_container(objects)), monkeypatch)
    assert settings.trainer_image == "registry.example.com/fim/trainer:2024.1"
    assert settings.serving_image == "ghcr.io/midfill/serving:0.1.1"
    assert settings.checkpoint_claim_name == "team-checkpoints"
    assert settings.standalone is True


def test_chart_version_matches_the_package_and_image_tags() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert DEFAULT_TRAINER_IMAGE.endswith(f":{chart['appVersion']}")
    assert DEFAULT_SERVING_IMAGE.endswith(f":{chart['appVersion']}")
