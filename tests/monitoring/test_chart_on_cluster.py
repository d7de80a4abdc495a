"""The chart's rendered objects are accepted by a real API server (server-side dry-run apply),
for each install shape: the default (the release namespace only), more watched namespaces, and
cluster-wide; the admission policy included."""

from __future__ import annotations

import pytest
import yaml

from tests.unit.test_chart import CHART, PROMETHEUS_OPERATOR_KINDS, helm

pytestmark = pytest.mark.integration


SHAPES = {
    "default": [],
    "watch-namespaces": ["--set", "watchNamespaces={default}"],
    "cluster-wide": ["--set", "rbac.clusterWide=true"],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_chart_passes_server_side_dry_run(kubectl, namespace: str, finetunejob_crd: str, shape: str) -> None:
    extra = SHAPES[shape]
    out = helm(
        "template",
        "kt",
        str(CHART),
        "--namespace",
        namespace,
        "--include-crds",
        "--set",
        "monitoring.dashboard.enabled=true",
        *extra,
    )
    assert out.returncode == 0, out.stderr
    # ServiceMonitor/PodMonitor/PrometheusRule need the Prometheus Operator's CRDs, which this cluster lacks.
    docs = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] not in PROMETHEUS_OPERATOR_KINDS]
    applied = kubectl(
        "apply",
        "--dry-run=server",
        "--server-side",
        "--field-manager=helm-test",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(docs),
    )
    assert applied.returncode == 0, applied.stderr
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "Service", "ConfigMap", "CustomResourceDefinition"} <= kinds
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
    assert applied.stdout.count("(server dry run)") == len(docs)
