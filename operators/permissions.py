"""Every (API group, resource, verbs) the operator uses, kept next to its code.

The Helm chart's RBAC is derived from this list (a test compares them), so granting exactly what
the operator needs is a one-place change. Keep it in step with operators/*/handlers.py.
"""

from __future__ import annotations

from typing import TypedDict


class PolicyRule(TypedDict):
    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


# Namespaced rules: granted by a ClusterRole, or by a Role per watched namespace.
NAMESPACED_RULES: list[PolicyRule] = [
    {"apiGroups": ["midfill.dev"], "resources": ["trainingruns", "modelreleases"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["midfill.dev"], "resources": ["trainingruns/status", "modelreleases/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["ray.io"], "resources": ["rayservices"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]

# Cluster-scoped rules: always a ClusterRole (kopf discovers resources and namespaces).
CLUSTER_RULES: list[PolicyRule] = [
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]
