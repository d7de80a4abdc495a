"""The operator's caches: FineTuneJobs and the children it owns, each fed by one informer per
watched namespace (or one for the whole cluster).

Children are watched by the `kubetune.io/job-name` label every child carries, so the
operator never caches other controllers' objects. A change to a child Job asks for a pass
of its FineTuneJob; pods, ConfigMaps and Services are only read by the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.resource import GROUP, PLURAL, VERSION
from kubetune.operator.informer import Informer, Key, Store
from kubetune.operator.kube import KubeApi
from kubetune.operator.naming import JOB_NAME_LABEL

CHILD_COLLECTIONS = {"Job": "/apis/batch/v1", "Pod": "/api/v1", "ConfigMap": "/api/v1", "Service": "/api/v1"}


def collection_path(kind: str, namespace: str | None) -> str:
    """Where a kind's objects are listed: in one namespace, or (None) cluster-wide."""
    if kind == "FineTuneJob":
        prefix, plural = f"/apis/{GROUP}/{VERSION}", PLURAL
    else:
        prefix, plural = CHILD_COLLECTIONS[kind], f"{kind.lower()}s"
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


@dataclass
class Caches:
    """One store per kind the reconcile pass reads."""

    stores: dict[str, Store] = field(default_factory=lambda: {k: Store() for k in ("FineTuneJob", *CHILD_COLLECTIONS)})

    def __getitem__(self, kind: str) -> Store:
        return self.stores[kind]

    def put(self, obj: dict[str, Any] | None) -> None:
        """Remember what one of the operator's own writes returned."""
        if obj and obj.get("kind") in self.stores:
            self.stores[obj["kind"]].put(obj)

    def informers(self, api: KubeApi, namespaces: list[str] | None,
                  on_job_change: Callable[[Key], None]) -> list[Informer]:
        """Informers feeding these stores; `on_job_change(key)` hears which FineTuneJob's Job changed."""
        def job_changed(obj: dict[str, Any]) -> None:
            meta = obj.get("metadata") or {}
            on_job_change((meta.get("namespace") or "", (meta.get("labels") or {}).get(JOB_NAME_LABEL, "")))

        out = []
        for ns in namespaces or [None]:
            out.append(Informer(api, collection_path("FineTuneJob", ns), self["FineTuneJob"]))
            for kind in CHILD_COLLECTIONS:
                out.append(Informer(api, collection_path(kind, ns), self[kind], label_selector=JOB_NAME_LABEL,
                                    on_change=job_changed if kind == "Job" else None))
        return out
