"""Session fixtures that put the integration tests on a real Kubernetes control plane.

The cluster comes from ``tests/cluster/kubecluster.py``: a cluster already started
by ``make cluster-up`` is reused (and left running); otherwise one is started in a
temporary dir for this session and stopped at its end, even when tests fail or the
test process is killed. Other test directories may re-export these fixtures. Tests
get an admin client, clients limited to a ServiceAccount's RBAC, the pinned kubectl,
and a fresh namespace each.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

import fakegpu
import kubecluster

FTJ_CRD = "finetunejobs.kubetune.io"


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kubecluster.ControlPlane]:
    """The session's control plane (one per session, even when other conftests re-export
    this fixture): ``make cluster-up``'s if it is running, else a private one."""
    with kubecluster.session_cluster(tmp_path_factory.mktemp("kube-cluster")) as plane:
        yield plane


@pytest.fixture(scope="session")
def kube_admin(kube_cluster: kubecluster.ControlPlane) -> Iterator[client.ApiClient]:
    """An API client with cluster-admin rights."""
    with kube_cluster.admin_client() as api:
        yield api


@pytest.fixture
def service_account_client(
    kube_cluster: kubecluster.ControlPlane,
) -> Iterator[Callable[[str, str], client.ApiClient]]:
    """``make(namespace, name)``: a client that has only that ServiceAccount's RBAC."""
    made: list[client.ApiClient] = []

    def make(namespace: str, name: str) -> client.ApiClient:
        made.append(kube_cluster.service_account_client(namespace, name))
        return made[-1]

    yield make
    for api in made:
        api.close()


@pytest.fixture
def kubectl(kube_cluster: kubecluster.ControlPlane) -> Callable[..., subprocess.CompletedProcess]:
    """Run the pinned kubectl against the test cluster; never raises on failure."""
    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*kube_cluster.kubectl_command(), *args], input=stdin,
                              capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture
def namespace(kube_admin: client.ApiClient) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists (so pods are admitted)."""
    core = client.CoreV1Api(kube_admin)
    name = f"it-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    fakegpu.wait_for(
        lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        what=f"ServiceAccount {name}/default")
    yield name
    core.delete_namespace(name)


@pytest.fixture
def finetunejob_crd(kube_admin: client.ApiClient) -> str:
    """The FineTuneJob CRD's name; the cluster applies it from manifests/crd/ on start-up."""
    crds = client.ApiextensionsV1Api(kube_admin).list_custom_resource_definition(
        field_selector=f"metadata.name={FTJ_CRD}").items
    if not crds:
        pytest.fail(f"CRD {FTJ_CRD} is not installed: the cluster should apply manifests/crd/ when it starts")
    return FTJ_CRD
