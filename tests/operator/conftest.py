"""The operator tests share the control-plane fixtures of `tests/integration` (opt-in, `-m integration`)
and add `start_operator` (see `operator_fixtures.py`) and the end-to-end tests' S3 server (`e2e_support.py`)."""

from e2e_support import s3  # noqa: F401 - fixtures are found by name
from operator_fixtures import operator_extra_rules, start_operator  # noqa: F401 - fixtures are found by name

from tests.integration.conftest import (  # noqa: F401
    finetunejob_crd,
    kube_admin,
    kube_cluster,
    kubectl,
    namespace,
    service_account_client,
)
