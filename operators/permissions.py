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
    # kopf watches the CRs and patches its annotations; operators/*/handlers.py GET them fresh under a lock.
    {
        "apiGroups": ["midfill.dev"],
        "resources": ["trainingruns", "modelreleases"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    # sync() writes status (one place per resource).
    {"apiGroups": ["midfill.dev"], "resources": ["trainingruns/status", "modelreleases/status"], "verbs": ["patch"]},
    # Children carry ownerReferences with blockOwnerDeletion, which (OwnerReferencesPermissionEnforcement)
    # requires update on the owner's finalizers subresource.
    {
        "apiGroups": ["midfill.dev"],
        "resources": ["trainingruns/finalizers", "modelreleases/finalizers"],
        "verbs": ["update"],
    },
    # Jobs: GET per attempt, kopf watches them (job_event), cleanup lists; create an attempt, delete on
    # start-up timeout / suspend / run deletion.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # Per-attempt ConfigMap and the run's headless Service: created, listed and deleted by cleanup.
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["list", "create", "delete"]},
    # kopf.event() posts core/v1 Events on phase changes.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # RayService: GET per sync, kopf watches it (rayservice_event), created, patched in place, deleted.
    {
        "apiGroups": ["ray.io"],
        "resources": ["rayservices"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # Peering when the operator watches namespaces (settings.standalone=false).
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]

# Cluster-scoped rules: always a ClusterRole. Namespace and CRD scanning are disabled
# (operators/startup.py), so only the cluster-wide peering object is needed.
CLUSTER_RULES: list[PolicyRule] = [
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]
