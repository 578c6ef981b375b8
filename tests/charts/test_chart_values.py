"""values.yaml documents every key (`# --`, helm-docs style) and values.schema.json types them:
it accepts the defaults and every ci/ values file, and rejects the mistakes it is there to catch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chartutil import CHART, CI_VALUES, run_helm

VALUES = CHART / "values.yaml"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _undocumented_keys(text: str) -> tuple[list[str], int]:
    """Block-style keys without a `# --` line in the comment block right above them.

    Flow-style values (`{requests: {cpu: 100m}}`) are documented as a whole by their key's comment.
    Returns (undocumented key paths, number of keys checked).
    """
    lines = text.splitlines()
    missing: list[str] = []
    checked = 0

    def documented(line_no: int) -> bool:
        i = line_no - 1
        while i >= 0 and lines[i].strip().startswith("#"):
            if lines[i].strip().startswith("# --"):
                return True
            i -= 1
        return False

    def walk(node: yaml.Node, path: str) -> None:
        nonlocal checked
        if isinstance(node, yaml.MappingNode) and not node.flow_style:
            for key, value in node.value:
                checked += 1
                name = f"{path}.{key.value}" if path else key.value
                if not documented(key.start_mark.line):
                    missing.append(name)
                walk(value, name)
        elif isinstance(node, yaml.SequenceNode) and not node.flow_style:
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    walk(yaml.compose(text), "")
    return missing, checked


def test_every_values_key_has_a_doc_comment() -> None:
    missing, checked = _undocumented_keys(VALUES.read_text())
    assert checked > 40, "the key walk found suspiciously few keys"
    assert not missing, f"values.yaml keys without a `# --` comment: {missing}"


def test_the_doc_comment_check_catches_a_missing_comment() -> None:
    text = "# -- documented\na: 1\nb:\n  # -- nested, documented\n  c: {x: 1}\n  d: 2\n"
    assert _undocumented_keys(text) == (["b", "b.d"], 4)


def _merged(overrides: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the defaults (maps merge, anything else replaces)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base.get(key), value)
            return out
        return copy.deepcopy(over)

    return merge(yaml.safe_load(VALUES.read_text()), overrides)


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_schema_accepts_defaults_and_ci_values(values_file: Path | None) -> None:
    overrides = yaml.safe_load(values_file.read_text()) if values_file else {}
    jsonschema.validate(_merged(overrides), SCHEMA)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"watchNamespaces": "team-a"}, "watchNamespaces"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"operator": {"healthPort": 0}}, "healthPort"),
        ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
        ({"operator": {"replicas": 2}}, "replicas"),
        ({"mlflow": {"enabled": False, "externalTrackingUri": ""}}, "externalTrackingUri"),
        ({"mlflow": {"artifacts": {"destination": "my-bucket"}}}, "destination"),
        ({"mlflow": {"persistence": {"size": "lots"}}}, "size"),
    ],
)
def test_schema_rejects_mistakes(helm: Path, overrides: dict[str, Any], field: str, tmp_path: Path) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_merged(overrides), SCHEMA)
    # helm applies the same schema at install time and names the field.
    values = tmp_path / "bad-values.yaml"
    values.write_text(yaml.safe_dump(overrides))
    proc = run_helm(helm, "template", "midfill", str(CHART), "--values", str(values))
    assert proc.returncode != 0
    assert field in proc.stderr, proc.stderr
