"""midfill.api: samples are valid against the models and the CRDs; bad specs name the field."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from midfill.api import SpecError, load_documents, load_file, parse_resource
from midfill.api.common import set_condition
from midfill.crds import build_crd, crd_json_schema

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("*.yaml"))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_is_valid_for_models_and_crd_schema(path: Path) -> None:
    for resource, doc in zip(load_file(path), load_documents(path.read_text()), strict=True):
        jsonschema.validate(doc, crd_json_schema(build_crd(resource.kind)))
        # What the operator writes back must also pass the schema (status included).
        wire = resource.to_wire()
        jsonschema.validate(wire, crd_json_schema(build_crd(resource.kind)))


def test_samples_cover_the_promised_set() -> None:
    names = {p.name for p in SAMPLES}
    assert {"trainingrun-debug.yaml", "trainingrun-7b-flash.yaml", "modelrelease.yaml"} <= names


def _tr(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "manifests/samples/trainingrun-debug.yaml").read_text())


def _mr(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "manifests/samples/modelrelease.yaml").read_text())


def _set(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return doc


# (kind, dotted field to set, value, expected error path, words the message must contain)
BAD_SPECS = [
    ("tr", "spec.parallelism.numNodes", 0, "spec.parallelism.numNodes", "greater than or equal to 1"),
    ("tr", "spec.parallelism.numNodez", 2, "spec.parallelism.numNodez", "did you mean 'numNodes'"),
    ("tr", "spec.model.recipe", "13b", "spec.model.recipe", "'13b' is not allowed"),
    ("tr", "spec.model.attention", "xformers", "spec.model.attention", "is not allowed"),
    ("tr", "spec.model.init", "models:/x", "spec.model.init", "models:/<name>/<version>"),
    ("tr", "spec.training.globalBatchTokens", 1000, "spec.training.globalBatchTokens", "multiple of seqLength"),
    ("tr", "spec.training.tokens", 10_000, "spec.training.tokens", "only one of steps"),
    ("tr", "spec.data.sources", [], "spec.data.sources", "at least 1"),
    ("tr", "spec.data.validationFraction", 0.9, "spec.data.validationFraction", "less than or equal to 0.5"),
    ("tr", "spec.resources.limits", {"nvidia.com/gpu": 8}, "spec.parallelism.nprocPerNode", "must equal"),
    (
        "tr",
        "spec.resources.requests",
        {"memory": "lots"},
        "spec.resources.requests.memory",
        "not a Kubernetes quantity",
    ),
    ("tr", "spec.model.attention", "flash_attention_2", "spec.model.attention", "nvidia.com/gpu"),
    ("tr", "spec.model.attention", "flex_attention", "spec.model.attention", "nvidia.com/gpu"),
    ("tr", "spec.training.compile", "sometimes", "spec.training.compile", "use auto"),
    ("tr", "spec.training.activationCheckpointing", "half", "spec.training.activationCheckpointing", "'full'"),
    ("tr", "spec.training.peakTflops", 0, "spec.training.peakTflops", "greater than 0"),
    ("tr", "spec.training.timeBudgetMinutes", 0, "spec.training.timeBudgetMinutes", "greater than 0"),
    (
        "tr",
        "spec.objective.spanCorruption.maskRatioMin",
        0.6,
        "spec.objective.spanCorruption.maskRatioMin",
        "<= maskRatioMax",
    ),
    ("tr", "spec.objective.spanCorruption.maxSpans", 20, "spec.objective.spanCorruption.maxSpans", "numMaskTokens"),
    ("tr", "spec.checkpoint.keepLast", 0, "spec.checkpoint.keepLast", "greater than or equal to 1"),
    ("tr", "metadata.name", "Bad_Name", "metadata.name", "lowercase letters"),
    ("mr", "spec.model.version", 3, "spec.model.version", "not both"),
    ("mr", "spec.autoscaling.minReplicas", 5, "spec.autoscaling.minReplicas", "<= maxReplicas"),
    ("mr", "spec.auth", {}, "spec.auth", "auth.disabled: true"),
    ("mr", "spec.rollout.canarySteps", [50, 10], "spec.rollout.canarySteps", "increasing"),
    ("mr", "spec.rollout.canarySteps", [], "spec.rollout.canarySteps", "ending at 100"),
    ("mr", "spec.rollout.canary.maxErrorRate", 2, "spec.rollout.canary.maxErrorRate", "less than or equal to 1"),
    ("mr", "spec.rollout.canary.stepSeconds", 0, "spec.rollout.canary.stepSeconds", "greater than or equal to 1"),
    ("mr", "spec.serving.maxNewTokens", 0, "spec.serving.maxNewTokens", "greater than or equal to 1"),
]


@pytest.mark.parametrize(
    ("kind", "field", "value", "path", "words"), BAD_SPECS, ids=[b[1] + "=" + str(b[2]) for b in BAD_SPECS]
)
def test_bad_specs_are_rejected_naming_the_field(repo_root: Path, kind, field, value, path, words) -> None:
    doc = _set(_tr(repo_root) if kind == "tr" else _mr(repo_root), field, value)
    with pytest.raises(SpecError) as info:
        parse_resource(doc)
    paths = {e.path: e.message for e in info.value.errors}
    assert path in paths, paths
    assert words in paths[path]


def test_flash_attention_with_fp32_precision_is_rejected(repo_root: Path) -> None:
    # FlashAttention takes only bf16/fp16 inputs; an fp32 run would fail at its first step on the GPUs.
    flash = yaml.safe_load((repo_root / "manifests/samples/trainingrun-7b-flash.yaml").read_text())
    with pytest.raises(SpecError) as info:
        parse_resource(_set(flash, "spec.training.precision", "fp32"))
    paths = {e.path: e.message for e in info.value.errors}
    assert "bf16" in paths["spec.training.precision"], paths
    parse_resource(_set(flash, "spec.training.precision", "auto"))


def test_unknown_kind_and_api_version(repo_root: Path) -> None:
    with pytest.raises(SpecError, match="unknown kind 'Deployment'"):
        parse_resource({**_tr(repo_root), "kind": "Deployment"})
    with pytest.raises(SpecError, match="use midfill.dev/v1alpha1"):
        parse_resource({**_tr(repo_root), "apiVersion": "midfill.dev/v2"})


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(SpecError) as info:
        load_documents("kind: TrainingRun\nspec: [unclosed\n")
    assert info.value.errors[0].path.startswith("line ")


def test_defaults_are_documented_and_applied(repo_root: Path) -> None:
    doc = _tr(repo_root)
    del doc["spec"]["checkpoint"]
    run = parse_resource(doc)
    assert run.spec.checkpoint.keep_last == 3
    assert run.spec.failure_policy.non_retryable_exit_codes == [78]
    assert run.registered_model_name() == "fim-debug"
    assert run.spec.objective.infill_format() == "codegen2"
    release = parse_resource(_set(_mr(repo_root), "spec.model", {"registeredModelName": "m"}))
    assert release.spec.model.effective_alias() == "champion"


def test_compile_is_auto_by_default_and_still_takes_true_or_false(repo_root: Path) -> None:
    doc = _tr(repo_root)
    del doc["spec"]["training"]["compile"]  # the sample turns it on (it pays off for its 10 minutes)
    run = parse_resource(doc)
    assert run.spec.training.compile == "auto" and run.spec.training.activation_checkpointing == "none"
    assert run.spec.training.compile_on("cuda") and not run.spec.training.compile_on("cpu")
    for value, on_cpu in ((True, True), (False, False), ("auto", False)):
        training = parse_resource(_set(_tr(repo_root), "spec.training.compile", value)).spec.training
        assert training.compile_on("cpu") is on_cpu and training.compile_on("cuda") is (value is not False)
        # the CRD takes a YAML bool or the keyword (the models validate which)
        doc = _set(_tr(repo_root), "spec.training.compile", value)
        jsonschema.validate(doc, crd_json_schema(build_crd("TrainingRun")))


def test_every_field_has_a_description() -> None:
    def walk(node, path):
        if isinstance(node, dict):
            if "type" in node or "x-kubernetes-int-or-string" in node:
                top = path.count(".") <= 1  # apiVersion/kind/metadata are Kubernetes' own
                assert top or node.get("description") or path.endswith(".items") or "additionalProperties" in path, path
            for key, sub in node.get("properties", {}).items():
                walk(sub, f"{path}.{key}")

    for kind in ("TrainingRun", "ModelRelease"):
        walk(build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"], kind)


def test_set_condition_moves_transition_time_only_on_flip() -> None:
    conds = set_condition([], type="Running", status="True", reason="Started", now="t1")
    conds = set_condition(conds, type="Running", status="True", reason="Still", now="t2")
    assert conds[0].last_transition_time == "t1" and conds[0].reason == "Still"
    conds = set_condition(conds, type="Running", status="False", reason="Done", now="t3")
    assert conds[0].last_transition_time == "t3" and len(conds) == 1
