"""The periodic pass over every FineTuneJob, which also re-reads rank 0's `/progress`.

A loop of the operator's own rather than a Kopf timer: Kopf puts a finalizer on every
object that has a timer, so FineTuneJobs could not be deleted while the operator is down,
and each deletion would wait for a running timer to notice. Listing the jobs each round
also picks up anything a missed watch event left behind.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from kubetune.api.resource import GROUP, PLURAL, VERSION
from kubetune.operator.handlers import run_pass
from kubetune.operator.kube import ApiError, KubeApi

LOG = logging.getLogger(__name__)


def list_paths(namespaces: list[str] | None) -> list[str]:
    """Where to list FineTuneJobs: each watched namespace, or the whole cluster."""
    if not namespaces:
        return [f"/apis/{GROUP}/{VERSION}/{PLURAL}"]
    return [f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}" for ns in namespaces]


def list_finetunejobs(api: KubeApi, memo: kopf.Memo, namespaces: list[str] | None) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    for path in list_paths(namespaces):
        try:
            bodies.extend(api.get(path).get("items") or [])
        except ApiError as exc:
            memo.metrics.api_errors.labels("list").inc()
            LOG.warning("cannot list FineTuneJobs at %s: %s", path, exc)
    return bodies


def _pass(body: dict[str, Any], memo: kopf.Memo) -> bool:
    try:
        run_pass(body, memo, LOG)
    except kopf.TemporaryError as exc:
        meta = body.get("metadata", {})
        LOG.warning("%s/%s: %s", meta.get("namespace"), meta.get("name"), exc)
        return False
    return True


def resync_once(api: KubeApi, memo: kopf.Memo, namespaces: list[str] | None) -> int:
    """One pass over every FineTuneJob, a few at a time (a slow rank 0 holds up only its own
    job); returns how many were reconciled without error."""
    bodies = list_finetunejobs(api, memo, namespaces)
    with ThreadPoolExecutor(max_workers=memo.settings.resync_workers, thread_name_prefix="kubetune-pass") as pool:
        return sum(pool.map(lambda body: _pass(body, memo), bodies))


def resync_forever(api: KubeApi, memo: kopf.Memo, namespaces: list[str] | None, stop: threading.Event) -> None:
    """Every `resync_seconds` until `stop` is set."""
    while not stop.wait(memo.settings.resync_seconds):
        resync_once(api, memo, namespaces)


def start_resync(api: KubeApi, memo: kopf.Memo, namespaces: list[str] | None,
                 stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=resync_forever, args=(api, memo, namespaces, stop), name="kubetune-resync")
    thread.daemon = True
    thread.start()
    return thread
