"""The Kubernetes permissions the operator needs, written once.

The Helm chart's Roles and ClusterRoles and the integration tests (which run the operator
under a ServiceAccount bound to exactly these rules) all read these lists, so a missing verb
shows up as a failing test rather than as a 403 in someone's cluster.

Least privilege: every write right is namespaced (`NAMESPACED_RULES`, granted by a Role in
each namespace the operator watches); cluster-wide the operator only reads what Kopf's
discovery needs (`CLUSTER_READ_RULES`). A cluster-wide install binds `CLUSTER_RULES` (both)
with a ClusterRole, and only when asked to. What the operator may write is further narrowed
by the chart's ValidatingAdmissionPolicy (only labelled, owned, non-privileged children).
"""

from __future__ import annotations

from typing import Any

from kubetune.api.resource import GROUP, PLURAL

NAMESPACED_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
)
"""In every namespace the operator watches. No Secrets: the operator never reads their values."""

CLUSTER_READ_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["get", "list", "watch"]},
)
"""Cluster-scoped reads for Kopf's observers: namespaces (which watched namespaces exist) and
CRDs (the FineTuneJob resource appearing or changing). Without them Kopf falls back to a
one-time scan with a warning; with them it follows both."""

CLUSTER_RULES: tuple[dict[str, Any], ...] = NAMESPACED_RULES + CLUSTER_READ_RULES
"""Everything, for a cluster-wide install (`rbac.clusterWide` in the chart) and the benchmark."""

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
