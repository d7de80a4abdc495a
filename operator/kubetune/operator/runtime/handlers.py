"""Kopf wiring: Kopf is the one watcher, of FineTuneJobs and of their children, and every handler
only records what it saw and asks the work queue for a pass (`passes.Controller`).

Indexing handlers put each copy Kopf lists or watches into the stores the passes read; Kopf
runs every other handler only once each collection's first listing has gone through them, so
the first FineTuneJob event opens the queue (`Controller.synced`) on full stores. A job new to
the operator (created, or found at start), a changed spec and a change of its Job queue a pass.
No handler needs a finalizer, so FineTuneJobs can be deleted while the operator is down.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes import client

from kubetune.api.resource import GROUP, PLURAL, VERSION
from kubetune.operator.naming import JOB_NAME_LABEL
from kubetune.operator.runtime.bookkeeping import SlimDiffBaseStorage
from kubetune.operator.runtime.passes import Controller
from kubetune.operator.runtime.watching import Store, key_of

LEGACY_FINALIZER = "kubetune.io/finalizer"
"""Set by operators that had a Kopf timer; named so that Kopf removes it (no handler here needs one)."""
FINETUNEJOBS = (GROUP, VERSION, PLURAL)
CHILDREN = {"Job": ("batch", "v1", "jobs"), "Pod": ("v1", "pods"), "ConfigMap": ("v1", "configmaps"),
            "Service": ("v1", "services")}
"""Watched by the `kubetune.io/job-name` label (on the server): other controllers' objects never arrive."""


async def cache(body: kopf.Body, param: Store, **_: Any) -> None:
    """Keep Kopf's copy in the store the passes read (it keeps the newest of it and our own writes)."""
    param.put(dict(body))


async def on_job_event(type: str | None, body: kopf.Body, param: Controller, **_: Any) -> None:
    """A FineTuneJob new to the operator or with a changed spec gets a pass; a deleted one is forgotten.

    The raw event, not `kopf.on.delete`: without a finalizer Kopf never calls delete handlers
    for an object that is already gone.
    """
    controller, uid, generation = param, body.metadata.uid or "", body.metadata.get("generation")
    if type == "DELETED":
        controller.forget(dict(body))
    elif controller.generations.get(uid) != generation:
        controller.generations[uid] = generation
        controller.synced.set()
        controller.enqueue(key_of(body))


async def on_child_event(type: str | None, body: kopf.Body, param: tuple[Controller, str], **_: Any) -> None:
    """A gone child leaves its store; a changed Job asks for a pass of its FineTuneJob."""
    controller, kind = param
    if type == "DELETED":
        controller.caches[kind].remove(dict(body))
    if kind == "Job":
        controller.enqueue((body.metadata.namespace or "", body.metadata.labels.get(JOB_NAME_LABEL, "")))


def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Kopf watches the children by label (on the server) and builds its per-event essence cheaply
    (`bookkeeping`); with no change handlers it stores no progress and no diff base."""
    settings.persistence.diffbase_storage = SlimDiffBaseStorage()
    settings.persistence.finalizer = LEGACY_FINALIZER
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubetune-operator"
    settings.watching.server_timeout = 300
    for resource in CHILDREN.values():
        settings.watching.label_selectors[resource] = JOB_NAME_LABEL


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """Kopf's credentials, from the same configuration the operator's own client uses."""
    bearer = configuration.auth_settings().get("BearerToken")
    token = str(bearer["value"]).removeprefix("Bearer ").strip() if bearer else None
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        token=token, certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
    )


def build_registry(configuration: client.Configuration, controller: Controller) -> kopf.OperatorRegistry:
    """A registry holding every handler of the operator, logged in as `configuration`."""
    registry = kopf.OperatorRegistry()

    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(configuration)

    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(configure)
    for kind, resource in {"FineTuneJob": FINETUNEJOBS, **CHILDREN}.items():
        kopf.index(*resource, id=f"cache-{kind}", param=controller.caches[kind], registry=registry)(cache)
        if kind != "FineTuneJob":
            kopf.on.event(*resource, id=f"event-{kind}", param=(controller, kind), registry=registry)(on_child_event)
    kopf.on.event(*FINETUNEJOBS, param=controller, registry=registry)(on_job_event)
    return registry
