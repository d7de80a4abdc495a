"""`Cluster` on a real API server: children read from the operator's stores, and writes that put
what they return into them.

Children are only ever recognised by the FineTuneJob's controller reference, so objects that
merely share a name are never taken.
"""

from __future__ import annotations

import concurrent.futures
import logging
from datetime import datetime
from typing import Any, Protocol

from kubetune.api.resource import API_VERSION, GROUP, KIND, FineTuneJob
from kubetune.operator import naming
from kubetune.operator.actions import (
    Action,
    CreateChild,
    DeleteFineTuneJob,
    DeleteJob,
    ReplaceConfigMapData,
    SetJobSuspend,
)
from kubetune.operator.cluster import JobRef
from kubetune.operator.events import Event
from kubetune.operator.observed import Observed
from kubetune.operator.reports import ProgressReport
from kubetune.operator.runtime.kube import ApiError, KubeApi, collection_path, object_path
from kubetune.operator.runtime.watching import Caches, key_of, version_of
from kubetune.operator.runtime.workqueue import WorkQueue
from kubetune.operator.timefmt import format_time

LOG = logging.getLogger(__name__)
EVENT_MESSAGE_LIMIT = 1024
COMPONENT = "kubetune-operator"


class ChildConflict(Exception):
    """A child's name is taken by an object another controller owns."""


def apply_in_order(cluster: Any, job: FineTuneJob, actions: list[Action]) -> list[str]:
    """Each action after the one before; a failed one does not stop the rest."""
    errors = []
    for action in actions:
        try:
            cluster.apply(job, action)
        except (ApiError, ChildConflict) as exc:  # the status is still true; retried next pass
            errors.append(f"{type(action).__name__}: {exc}")
    return errors


def uid_of(job: FineTuneJob) -> str:
    return (job.metadata.model_extra or {}).get("uid", "")


def owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
    refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == uid for r in refs)


def job_ended(batch_job: dict[str, Any] | None) -> bool:
    """The Job has its Complete or Failed condition."""
    conditions = ((batch_job or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


class ProgressSource(Protocol):
    """Where `KubeCluster` takes rank 0's readings from (`progress_reader.ProgressReader`)."""

    def take(self, key: tuple[str, str], pod: dict[str, Any]) -> Any: ...


class NoProgress:
    """Reads nothing: a cluster built without a reader (tests of its other parts)."""

    def take(self, key: tuple[str, str], pod: dict[str, Any]) -> Any:
        return None


class KubeCluster:
    """`Cluster` on a real API server, reading children from `caches`."""

    CREATE_THREADS = 16

    def __init__(self, api: KubeApi, caches: Caches | None = None, progress: ProgressSource | None = None,
                 work: WorkQueue | None = None) -> None:
        self.api = api
        self.caches = caches if caches is not None else Caches()
        self.progress = progress if progress is not None else NoProgress()
        self.work = work if work is not None else WorkQueue()  # the passes' queue: are other new jobs waiting?
        self._creates = concurrent.futures.ThreadPoolExecutor(self.CREATE_THREADS, "kubetune-create")

    def others_first(self, ref: JobRef) -> bool:
        return self.work.urgent_besides((ref.namespace, ref.name))

    def close(self) -> None:
        self._creates.shutdown(wait=True)

    def observe(self, job: FineTuneJob) -> Observed:
        ns, name, uid = job.metadata.namespace or "default", job.metadata.name, uid_of(job)

        def mine(kind: str, child: str) -> dict[str, Any] | None:
            obj = self.caches[kind].get(ns, child)
            return obj if owned_by(obj, uid) else None

        batch_job = mine("Job", naming.batch_job_name(name))
        pods = self._fresh_pods(ns, name) if job_ended(batch_job) else self.caches["Pod"].labelled(ns, name)
        return Observed(
            job=batch_job,
            pods=tuple(pods),
            configmap=mine("ConfigMap", naming.configmap_name(name)),
            service=mine("Service", naming.service_name(name)),
            peers=tuple(p for p in self.caches["FineTuneJob"].items() if p.get("metadata", {}).get("uid") != uid),
            # only a new attempt waits for the Secret: with a Job, the pods report on it
            **(self._secret_check(job) if batch_job is None else {"secret_checked": False}),
        )

    def relist(self, namespaces: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
        """List each collection the stores hold again and drop what is gone from it: a delete Kopf
        missed in a watch gap (after one it lists again, but reports no vanished object). Returns
        the FineTuneJobs dropped, for the passes to forget."""
        pruned = []
        for kind, store in self.caches.items():
            selector = {"labelSelector": naming.JOB_NAME_LABEL} if kind != "FineTuneJob" else {}
            for ns in namespaces or [None]:
                listing = self.api.get(collection_path(kind, ns), **selector)
                listed = {key_of(o) for o in listing.get("items") or ()}
                pruned += [o for o in store.prune(ns, listed, version_of(listing)) if kind == "FineTuneJob"]
        return pruned

    def _fresh_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The pods as the API server has them now: an ended Job is judged by its pods' exit codes
        and last words, and the pod watch may not have shown those yet when the Job's did."""
        selector = f"{naming.JOB_NAME_LABEL}={name}"
        pods = self.api.get(collection_path("Pod", namespace), labelSelector=selector).get("items") or []
        for pod in pods:
            pod.setdefault("kind", "Pod")
            self.caches.put(pod)
        return pods

    def _secret_check(self, job: FineTuneJob) -> dict[str, Any]:
        """The key names of the credentials Secret, when the operator is allowed to look."""
        ref = job.spec.storage.secret_ref
        if ref is None:
            return {"secret_keys": None}
        try:
            secret = self.api.get_or_none(object_path("Secret", job.metadata.namespace or "default", ref.name))
        except ApiError as exc:
            if exc.forbidden:  # permissions.SECRET_CHECK_RULES not granted: the pods will tell
                return {"secret_keys": None, "secret_checked": False}
            raise
        return {"secret_keys": None if secret is None else frozenset(secret.get("data") or {})}

    def apply_all(self, job: FineTuneJob, actions: list[Action]) -> list[str]:
        """A new job's children are created at once: the Job does not wait for the ConfigMap and
        Service round trips (its pods wait for the ConfigMap, as a kubelet does). Anything
        else runs in order: a restarted attempt must find the ConfigMap already replaced."""
        if not all(isinstance(a, CreateChild) for a in actions):
            return apply_in_order(self, job, actions)
        futures = [self._creates.submit(apply_in_order, self, job, [a]) for a in actions]
        return [error for future in futures for error in future.result()]

    def apply(self, job: FineTuneJob, action: Action) -> None:
        ns = job.metadata.namespace or "default"
        if isinstance(action, CreateChild):
            self._create_or_adopt(job, action.obj)
        elif isinstance(action, ReplaceConfigMapData):
            self.caches.put(self.api.request("PATCH", object_path("ConfigMap", ns, action.name), {"data": action.data}))
        elif isinstance(action, SetJobSuspend):
            self.caches.put(self.api.request("PATCH", object_path("Job", ns, action.name),
                                                 {"spec": {"suspend": action.suspend}}))
        elif isinstance(action, DeleteJob):
            options = {"propagationPolicy": "Foreground", "preconditions": {"uid": action.uid}}
            self._delete(object_path("Job", ns, action.name), options)
        elif isinstance(action, DeleteFineTuneJob):
            self._delete(object_path("FineTuneJob", ns, job.metadata.name), {"propagationPolicy": "Background"})

    def _delete(self, path: str, options: dict[str, Any]) -> None:
        try:
            self.api.request("DELETE", path, {"apiVersion": "v1", "kind": "DeleteOptions", **options})
        except ApiError as exc:
            if not (exc.not_found or exc.conflict):
                raise

    def _create_or_adopt(self, job: FineTuneJob, obj: dict[str, Any]) -> None:
        """Create a child; when its name exists without a controller, take ownership of it.

        No GET first: the cache says it is missing, and AlreadyExists (a create the watch has
        not shown yet, or someone else's object) is the rare case.
        """
        path = collection_path(obj["kind"], obj["metadata"]["namespace"])
        try:
            self.caches.put(self.api.request("POST", path, obj))
            return
        except ApiError as exc:
            if not exc.conflict:
                raise
        existing = self.api.get(f"{path}/{obj['metadata']['name']}")
        refs = existing.get("metadata", {}).get("ownerReferences") or []
        if owned_by(existing, uid_of(job)):
            self.caches.put({**existing, "kind": obj["kind"]})
            return
        if any(r.get("controller") for r in refs):
            raise ChildConflict(f"{obj['kind']} {obj['metadata']['name']} is owned by another controller")
        labels = existing.get("metadata", {}).get("labels") or {}
        if (labels.get(naming.MANAGED_BY_LABEL), labels.get(naming.JOB_NAME_LABEL)) != (
                naming.MANAGED_BY, job.metadata.name):
            # only an orphaned child of this job is adopted; the admission policy refuses the rest
            raise ChildConflict(f"{obj['kind']} {obj['metadata']['name']} exists and is not labelled as a "
                                f"child of this FineTuneJob ({naming.MANAGED_BY_LABEL}={naming.MANAGED_BY}, "
                                f"{naming.JOB_NAME_LABEL}={job.metadata.name}); rename or delete it")
        adopt = {"metadata": {"ownerReferences": [*refs, naming.owner_reference(job)],
                              "labels": obj["metadata"]["labels"]}}
        self.caches.put(self.api.request("PATCH", f"{path}/{obj['metadata']['name']}", adopt))

    def write_status(self, ref: JobRef, patch: dict[str, Any]) -> None:
        path = object_path("FineTuneJob", ref.namespace, ref.name) + "/status"
        try:
            self.caches.put(self.api.request("PATCH", path, {"status": patch}))
        except ApiError as exc:  # deleted: it leaves the store, and its pass forgets it (`Controller`)
            if exc.not_found and (held := self.caches["FineTuneJob"].get(ref.namespace, ref.name)):
                self.caches["FineTuneJob"].remove(held)
            raise

    def post_event(self, ref: JobRef, event: Event, now: datetime) -> None:
        """Posted by the pass that decided it, so one job's events keep their order and carry its time.

        In a burst of new jobs that pass is a routine one, run once their children are created
        (`WorkQueue`), so the events of a burst give way to its Jobs. An event is the story of
        a job, not its state: one that cannot be posted is logged, and the pass goes on.
        """
        ns, stamp = ref.namespace, format_time(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ns},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": ref.name,
                               "namespace": ns, "uid": ref.uid},
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:EVENT_MESSAGE_LIMIT],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{GROUP}/operator",
        }
        try:
            self.api.request("POST", collection_path("Event", ns), body)
        except Exception as exc:
            LOG.warning("event %s for %s/%s not posted: %s", event.reason, ns, ref.name, exc)

    def take_progress(self, job: FineTuneJob, pod: dict[str, Any]) -> ProgressReport | None:
        return self.progress.take((job.metadata.namespace or "default", job.metadata.name), pod)
