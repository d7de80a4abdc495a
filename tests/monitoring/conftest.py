"""The monitoring tests share the control-plane fixtures of `tests/integration` (opt-in, `-m integration`)."""

from tests.integration.conftest import (  # noqa: F401 - fixtures are found by name
    finetunejob_crd,
    kube_admin,
    kube_cluster,
    kubectl,
    namespace,
)
