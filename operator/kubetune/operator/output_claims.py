"""Which job may write an output prefix: the operator's side of output ownership.

Two live FineTuneJobs whose `spec.output.uri` prefixes overlap would resume from, prune and
overwrite each other's checkpoints and outputs. Before a job first starts, the operator
looks at the other FineTuneJobs it watches: when a live one claims an overlapping prefix,
this job is refused (Failed, reason OutputConflict, naming the other job) and no child is
created. The trainer checks the same thing against what the prefix already holds (the
owner recorded in each checkpoint manifest), which also covers jobs the operator cannot
see: deleted ones, other namespaces, `kubetune run` on a laptop.

Which of two new jobs wins is decided by the objects alone, so every pass and every
operator replica agrees: a job that has started holds its prefix; between two that have
not, the older (creationTimestamp, then namespace/name) does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.uris import overlaps, parse_uri

ENDED = ("Succeeded", "Failed")
STARTED = ("Staging", "Running", "Restarting", "Suspended")


@dataclass(frozen=True)
class Claim:
    """Another FineTuneJob's hold on an output prefix."""

    namespace: str
    name: str
    uri: str
    phase: str

    @property
    def job(self) -> str:
        return f"{self.namespace}/{self.name}"


def _order(meta: dict[str, Any]) -> tuple[str, str, str]:
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _started(status: dict[str, Any]) -> bool:
    if status.get("phase") in STARTED or status.get("startTime"):
        return True
    return any(c.get("type") == "Created" and c.get("status") == "True"
               for c in status.get("conditions") or [] if isinstance(c, dict))


def _store(uri: str, namespace: Any, endpoint: Any) -> tuple[str, Any]:
    """What makes two equal prefixes one place: a PVC is the namespace's, an S3 bucket the endpoint's."""
    scheme = parse_uri(uri).scheme
    if scheme == "pvc":
        return scheme, namespace
    if scheme == "s3":
        return scheme, (str(endpoint).rstrip("/") if endpoint else None)
    return scheme, None


def holder(job: FineTuneJob, peers: tuple[dict[str, Any], ...]) -> Claim | None:
    """The live job that holds a prefix overlapping `job`'s output, or None when `job` may use it."""
    mine = job.spec.output.uri
    my_store = _store(mine, job.metadata.namespace, job.spec.storage.endpoint)
    meta = job.metadata.model_dump(by_alias=True)
    my_order, my_uid = _order(meta), meta.get("uid")
    for peer in sorted(peers, key=lambda p: _order(p.get("metadata") or {})):
        peer_meta, status = peer.get("metadata") or {}, peer.get("status") or {}
        if (my_uid and peer_meta.get("uid") == my_uid) or peer_meta.get("deletionTimestamp"):
            continue
        if (peer_meta.get("namespace"), peer_meta.get("name")) == (meta.get("namespace"), meta.get("name")):
            continue
        spec = peer.get("spec") if isinstance(peer.get("spec"), dict) else {}
        uri = (spec.get("output") or {}).get("uri") if isinstance(spec.get("output"), dict) else None
        if not isinstance(uri, str) or not overlaps(mine, uri) or status.get("phase") in ENDED:
            continue
        endpoint = (spec.get("storage") or {}).get("endpoint") if isinstance(spec.get("storage"), dict) else None
        if _store(uri, peer_meta.get("namespace"), endpoint) != my_store:
            continue
        if _started(status) or _order(peer_meta) < my_order:
            return Claim(str(peer_meta.get("namespace") or ""), str(peer_meta.get("name") or ""), uri,
                         str(status.get("phase") or "Pending"))
    return None
