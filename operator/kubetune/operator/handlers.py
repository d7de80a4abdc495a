"""Kopf wiring: every handler runs the same reconcile pass; state arrives as keyword arguments.

Create, spec update and operator resume call `reconcile` here; a change to a child Job
and the periodic resync queue the same pass (`resync`). API errors become
`kopf.TemporaryError` so Kopf retries; the pass itself writes the status once and emits
events after it. No handler needs a finalizer, so FineTuneJobs can be deleted while the
operator is down.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client

from kubetune.api.resource import GROUP, PLURAL, VERSION
from kubetune.operator.bookkeeping import MemoryDiffBaseStorage, MemoryProgressStorage
from kubetune.operator.informer import newest
from kubetune.operator.kube import ApiError
from kubetune.operator.liveness import PassClock
from kubetune.operator.reconcile import reconcile

RETRY_DELAY_SECONDS = 10.0
DEFERRED_PASS_SECONDS = 0.5
ANNOTATION_PREFIX = "kubetune.io"
_UNWATCHED = PassClock()
"""Times the passes of a memo without `passes` (tests); nothing asks it."""


def run_pass(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger | Any) -> None:
    """One reconcile pass, serialised per FineTuneJob (handlers and timer may overlap), timed from the start
    (waiting for the lock included) for liveness."""
    meta = body.get("metadata", {})
    key = (meta.get("namespace", ""), meta.get("name", ""))
    with memo.get("passes", _UNWATCHED).running(key), memo.locks.setdefault(meta.get("uid", ""), threading.Lock()), \
            memo.metrics.reconcile_duration.time():
        if "caches" in memo:  # the copy our last status write returned may be newer than Kopf's
            body = newest(body, memo.caches["FineTuneJob"].get(meta.get("namespace", ""), meta.get("name", "")))
        try:
            outcome = reconcile(body, memo.cluster, memo.settings, memo.metrics, datetime.now(UTC))
        except ApiError as exc:
            memo.metrics.api_errors.labels("reconcile").inc()
            raise kopf.TemporaryError(f"Kubernetes API error: {exc}", delay=RETRY_DELAY_SECONDS) from exc
    if outcome.deferred and "queue" in memo:  # soon, not at once: our cache may not hold the job yet
        memo.queue.add_after(key, DEFERRED_PASS_SECONDS)
    if outcome.errors:
        memo.metrics.api_errors.labels("apply").inc(len(outcome.errors))
        raise kopf.TemporaryError("; ".join(outcome.errors), delay=RETRY_DELAY_SECONDS)
    if outcome.events:
        logger.info("%s: %s", outcome.status.phase, "; ".join(e.reason for e in outcome.events))


def on_change(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    run_pass(body, memo, logger)


def on_event(type: str | None, uid: str, memo: kopf.Memo, namespace: str | None = None, name: str | None = None,
             **_: Any) -> None:
    """A FineTuneJob is gone: its children go by owner reference; only our own bookkeeping is left
    (and rank 0's last readings).

    The raw DELETED event, not `kopf.on.delete`: without a finalizer Kopf never calls delete
    handlers for an object that is already gone.
    """
    if type != "DELETED":
        return
    memo.metrics.forget(uid)
    memo.locks.pop(uid, None)
    if "progress" in memo:
        memo.progress.forget((namespace or "", name or ""))
    for storage in memo.get("bookkeeping", ()):
        storage.forget(uid)


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Kopf keeps its bookkeeping in memory (`bookkeeping`): never in the status, which belongs to
    the FineTuneJob schema, and not in annotations, which would cost two writes per new job."""
    progress, diffbase = MemoryProgressStorage(), MemoryDiffBaseStorage()
    memo.bookkeeping = (progress, diffbase)
    settings.persistence.progress_storage = progress
    settings.persistence.diffbase_storage = diffbase
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubetune-operator"
    settings.watching.server_timeout = 300
    settings.execution.max_workers = memo.settings.pass_workers


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """Kopf's credentials, from the same configuration the operator's own client uses."""
    bearer = configuration.auth_settings().get("BearerToken")
    token = str(bearer["value"]).removeprefix("Bearer ").strip() if bearer else None
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        token=token, certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
    )


def build_registry(configuration: client.Configuration) -> kopf.OperatorRegistry:
    """A registry holding every handler of the operator, logged in as `configuration`."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(configuration)

    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.create(*resource, registry=registry)(on_change)
    kopf.on.resume(*resource, registry=registry)(on_change)
    kopf.on.update(*resource, field="spec", registry=registry)(on_change)
    kopf.on.event(*resource, registry=registry)(on_event)
    return registry
