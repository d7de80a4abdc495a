"""Leader election on a coordination.k8s.io Lease, so that of two replicas only one acts.

The standby replica waits; the leader renews the Lease and, should it fail to renew for a whole lease duration,
stops itself (to be restarted as a standby) rather than risk two operators writing one status. `lease_decision` is pure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from kubetune.operator.runtime.kube import ApiError, KubeApi, collection_path, object_path
from kubetune.operator.timefmt import parse_time

LOG = logging.getLogger(__name__)
Decision = Literal["create", "renew", "take-over", "standby"]


def micro_time(moment: datetime) -> str:
    """metav1.MicroTime, as Lease times are written."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_decision(spec: Mapping[str, Any] | None, me: str, now: datetime) -> Decision:
    """What `me` may do with the Lease as it stands."""
    if spec is None:
        return "create"
    if (holder := spec.get("holderIdentity")) == me:
        return "renew"
    renewed = parse_time(spec.get("renewTime"))
    duration = timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))
    return "take-over" if not holder or renewed is None or now > renewed + duration else "standby"


def next_lease_spec(spec: Mapping[str, Any] | None, me: str, now: datetime, duration: int,
                    decision: Decision) -> dict[str, Any]:
    spec, stamp = dict(spec or {}), micro_time(now)
    if decision != "renew":
        spec["acquireTime"] = stamp
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (decision == "take-over")
    spec.update({"holderIdentity": me, "leaseDurationSeconds": duration, "renewTime": stamp})
    return spec


@dataclass
class LeaderElector:
    """Acquires and keeps one Lease for `identity`."""

    api: KubeApi
    namespace: str
    name: str
    identity: str
    duration: int = 15
    retry_seconds: float = 2.0
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def try_hold(self) -> bool:
        """One attempt to acquire or renew; True while this replica is the leader (an API error: not now)."""
        now, path = self.clock(), object_path("Lease", self.namespace, self.name)
        try:
            current = (lease := self.api.get_or_none(path)) and lease.get("spec")
            if (decision := lease_decision(current, self.identity, now)) == "standby":
                return False
            spec = next_lease_spec(current, self.identity, now, self.duration, decision)
            new = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": self.name}}
            method, where = ("PUT", path) if lease else ("POST", collection_path("Lease", self.namespace))
            self.api.request(method, where, {**(lease or new), "spec": spec})  # a stale resourceVersion: a conflict
        except ApiError as exc:
            if not exc.conflict:  # a conflict: another replica wrote it first
                LOG.warning("Lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        return True

    def wait_until_leader(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self.try_hold():
                LOG.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
                return True
            stop.wait(self.retry_seconds)
        return False

    def keep_renewing(self, stop: threading.Event, lost: threading.Event) -> None:
        """Renew until `stop`; set `lost` and `stop` when the Lease could not be kept for its duration."""
        last = self.clock()
        while not stop.wait(self.retry_seconds):
            if self.try_hold():
                last = self.clock()
            elif (self.clock() - last).total_seconds() > self.duration:
                LOG.error("lost Lease %s/%s; stopping so that only one operator acts", self.namespace, self.name)
                lost.set()
                stop.set()
