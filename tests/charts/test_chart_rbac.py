"""The chart grants exactly what the operator declares it uses (operators/permissions.py):
nothing missing (the operator would fail with 403s), nothing extra (least privilege)."""

from __future__ import annotations

from typing import Any

import yaml
from chartutil import CHART, NAMESPACE, by_kind, one

from operators.permissions import CLUSTER_RULES, NAMESPACED_RULES

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)


def grants(rules: list[dict[str, Any]]) -> set[Grant]:
    """Flatten rules to (group, resource, verb) triples: the unit RBAC actually grants."""
    out: set[Grant] = set()
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    out.add((group, resource, verb))
    return out


def _fix_hint() -> str:
    return "\nThe chart's RBAC is stale: run `make chart-rbac manifests` (writes templates/_rbac.tpl from operators/permissions.py)."


def _assert_same(actual: set[Grant], expected: set[Grant], what: str) -> None:
    missing, extra = sorted(expected - actual), sorted(actual - expected)
    assert not missing and not extra, f"{what}: missing {missing}, extra {extra}{_fix_hint()}"


def _subjects_are_the_operator(binding: dict[str, Any]) -> None:
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "midfill", "namespace": NAMESPACE}]


def test_cluster_wide_install_grants_both_lists_in_one_clusterrole(render: Any) -> None:
    objects = render()
    role = one(objects, "ClusterRole")
    _assert_same(grants(role["rules"]), grants(NAMESPACED_RULES) | grants(CLUSTER_RULES), "ClusterRole")
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    _subjects_are_the_operator(binding)
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "midfill"


def test_namespaced_install_grants_namespaced_rules_only_in_watched_namespaces(render: Any) -> None:
    objects = render(CHART / "ci" / "namespaced-values.yaml")
    watched = yaml.safe_load((CHART / "ci" / "namespaced-values.yaml").read_text())["watchNamespaces"]
    cluster_role = one(objects, "ClusterRole")
    _assert_same(grants(cluster_role["rules"]), grants(CLUSTER_RULES), "ClusterRole (namespaced install)")
    _subjects_are_the_operator(one(objects, "ClusterRoleBinding"))
    roles = {r["metadata"]["namespace"]: r for r in by_kind(objects, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objects, "RoleBinding")}
    assert sorted(roles) == sorted(bindings) == sorted(watched)
    for namespace in watched:
        _assert_same(grants(roles[namespace]["rules"]), grants(NAMESPACED_RULES), f"Role in {namespace}")
        assert bindings[namespace]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[namespace]["metadata"]["name"],
        }
        _subjects_are_the_operator(bindings[namespace])


def test_rbac_create_false_renders_no_rbac(render: Any) -> None:
    objects = render(set_values=("rbac.create=false",))
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not by_kind(objects, kind), kind


def test_existing_service_account_is_bound_not_created(render: Any) -> None:
    objects = render(set_values=("serviceAccount.create=false", "serviceAccount.name=platform-operator"))
    assert not by_kind(objects, "ServiceAccount")
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == "platform-operator"
    pod = one(objects, "Deployment", "midfill")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-operator"
