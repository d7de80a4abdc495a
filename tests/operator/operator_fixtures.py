"""`start_operator`: Kopf operators in threads, each acting as the test namespace's
`kubetune-operator` ServiceAccount bound to the RBAC that `manifests/operator.yaml` ships."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import fakegpu
import pytest
from cluster_support import (
    LEASE,
    OPERATOR_SA,
    RunningOperator,
    can_list_jobs,
    free_port,
    grant_operator_rights,
    revoke_operator_rights,
)
from kubernetes import client

from kubetune.operator.permissions import SECRET_CHECK_RULES
from kubetune.operator.runtime.main import run
from kubetune.operator.settings import OperatorSettings


@pytest.fixture
def operator_extra_rules() -> list[dict[str, Any]]:
    """Rules granted beside the shipped ones; a test overrides this to drop the optional Secret check."""
    return list(SECRET_CHECK_RULES)


@pytest.fixture
def start_operator(kube_admin: client.ApiClient, namespace: str, finetunejob_crd: str,
                   service_account_client: Callable[[str, str], client.ApiClient],
                   operator_extra_rules: list[dict[str, Any]]) -> Iterator[Callable[..., RunningOperator]]:
    """`start(identity, lease_seconds, **settings)`: an operator watching the test namespace."""
    grant_operator_rights(kube_admin, namespace, operator_extra_rules)
    operator_api = service_account_client(namespace, OPERATOR_SA)
    fakegpu.wait_for(lambda: can_list_jobs(operator_api, namespace), what="the operator's RBAC")
    started: list[RunningOperator] = []

    def start(identity: str = "op-a", lease_seconds: int = 15, **overrides: Any) -> RunningOperator:
        stop, ready, exit_code = threading.Event(), threading.Event(), []
        values = {"default_image": "registry.invalid/kubetune:test", "resync_seconds": 1.0,
                  "progress_timeout_seconds": 0.2, "restart_backoff_seconds": 0.0, **overrides}
        port = free_port()
        kwargs = {"settings": OperatorSettings(**values), "configuration": operator_api.configuration,
                  "http_port": port, "identity": identity, "lease": (namespace, LEASE),
                  "lease_seconds": lease_seconds, "stop": stop, "ready": ready}
        thread = threading.Thread(target=lambda: exit_code.append(run([namespace], **kwargs)), daemon=True)
        thread.start()
        started.append(RunningOperator(identity, thread, stop, ready, port, exit_code))
        return started[-1]

    yield start
    for operator in started:
        operator.halt()
    revoke_operator_rights(kube_admin, namespace)
