"""The Kubernetes permissions the operator needs, written once.

The Helm chart's ClusterRole and the integration tests (which run the operator under a
ServiceAccount bound to exactly these rules) both read this list, so a missing verb
shows up as a failing test rather than as a 403 in someone's cluster.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.resource import GROUP, PLURAL

CLUSTER_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["get", "list", "watch"]},
)
"""Everywhere the operator watches. No Secrets: the operator never reads their values."""

SECRET_CHECK_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
)
"""Optional, and not granted by the chart: lets the operator check the credentials Secret's key
names before it creates pods. Without it (a 403) the check is skipped and a missing Secret
shows up as the trainer pods' CreateContainerConfigError instead."""

LEASE_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
)
"""In the operator's own namespace: the leader-election Lease."""
