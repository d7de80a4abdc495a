"""The chart's rendered objects are accepted by a real API server (server-side dry-run apply),
for a cluster-wide and a namespaced install."""

from __future__ import annotations

import pytest
import yaml

from tests.unit.test_chart import CHART, PROMETHEUS_OPERATOR_KINDS, helm

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("watch_own_namespace", [False, True], ids=["cluster-wide", "namespaced"])
def test_rendered_chart_passes_server_side_dry_run(
    kubectl, namespace: str, finetunejob_crd: str, watch_own_namespace: bool
) -> None:
    extra = ["--set", f"watchNamespaces={{{namespace}}}"] if watch_own_namespace else []
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
    assert applied.stdout.count("(server dry run)") == len(docs)
