"""The Grafana dashboard, built from a table of panels so every PromQL expression sits in one
place (tests parse each with promtool and check its metric names against live /metrics).

`make chart` writes it to charts/kubetune/files/dashboard.json; the chart ships it in a
ConfigMap labelled for the Grafana sidecar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

JOB = '{namespace=~"$namespace", name=~"$job"}'
NS = '{namespace=~"$namespace"}'
DCGM_POD = '{namespace=~"$namespace", pod=~"$job-.*"}'


@dataclass(frozen=True)
class Panel:
    """One time-series panel: title, unit and (legend, expression) pairs."""

    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]
    width: int = 12


PANELS: tuple[Panel, ...] = (
    Panel("FineTuneJobs by phase", "short", (("{{phase}}", f"sum by (phase) (kubetune_operator_jobs{NS})"),)),
    Panel(
        "Restarts (1h)",
        "short",
        (("{{namespace}}", f"sum by (namespace) (increase(kubetune_operator_jobs_restarted_total{NS}[1h]))"),),
    ),
    Panel(
        "Training loss",
        "short",
        (
            ("{{name}} step loss", f"kubetune_trainer_step_loss{JOB}"),
            ("{{name}} smoothed loss", f"kubetune_trainer_smoothed_loss{JOB}"),
        ),
    ),
    Panel("Validation loss", "short", (("{{name}}", f"kubetune_trainer_validation_loss{JOB}"),)),
    Panel("Steps per second", "short", (("{{name}}", f"rate(kubetune_trainer_step{JOB}[5m])"),)),
    Panel("Images per second", "short", (("{{name}}", f"kubetune_trainer_images_per_second{JOB}"),)),
    Panel(
        "Progress", "percentunit", (("{{name}}", f"kubetune_trainer_step{JOB} / kubetune_trainer_total_steps{JOB}"),)
    ),
    Panel(
        "ETA",
        "s",
        (
            (
                "{{name}}",
                f"(kubetune_trainer_total_steps{JOB} - kubetune_trainer_step{JOB})"
                f" / rate(kubetune_trainer_step{JOB}[10m])",
            ),
        ),
    ),
    Panel("Staging throughput", "Bps", (("{{name}}", f"rate(kubetune_trainer_staged_bytes_total{JOB}[5m])"),)),
    Panel(
        "Checkpoint upload time (p90)",
        "s",
        (
            (
                "{{name}}",
                "histogram_quantile(0.9, sum by (name, le) "
                f"(rate(kubetune_trainer_checkpoint_upload_seconds_bucket{JOB}[1h])))",
            ),
        ),
    ),
    Panel(
        "Operator reconcile latency",
        "s",
        (
            (
                "p50",
                "histogram_quantile(0.5, sum by (le) (rate(kubetune_operator_reconcile_duration_seconds_bucket[5m])))",
            ),
            (
                "p99",
                "histogram_quantile(0.99, sum by (le) (rate(kubetune_operator_reconcile_duration_seconds_bucket[5m])))",
            ),
        ),
    ),
    Panel(
        "Operator API errors",
        "short",
        (("{{operation}}", "sum by (operation) (rate(kubetune_operator_api_errors_total[5m]))"),),
    ),
    Panel("GPU utilisation (DCGM)", "percent", (("{{pod}} {{gpu}}", f"DCGM_FI_DEV_GPU_UTIL{DCGM_POD}"),)),
    Panel("GPU memory used (DCGM, MiB)", "decmbytes", (("{{pod}} {{gpu}}", f"DCGM_FI_DEV_FB_USED{DCGM_POD}"),)),
    Panel(
        "GPU memory allocated by the trainer",
        "bytes",
        (("{{name}}", f"kubetune_trainer_gpu_memory_allocated_bytes{JOB}"),),
    ),
)


def _variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


def _panel(index: int, panel: Panel) -> dict:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": panel.title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {"expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
            for i, (legend, expr) in enumerate(panel.targets)
        ],
    }


def build_dashboard() -> dict:
    datasource = {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}
    return {
        "uid": "kubetune",
        "title": "kubetune: fine-tuning jobs",
        "tags": ["kubetune"],
        "schemaVersion": 39,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                datasource,
                _variable("namespace", "label_values(kubetune_trainer_step, namespace)"),
                _variable("job", 'label_values(kubetune_trainer_step{namespace=~"$namespace"}, name)'),
            ]
        },
        "panels": [_panel(i, p) for i, p in enumerate(PANELS)],
    }


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard, Grafana variables as in the JSON."""
    return [expr for panel in PANELS for _, expr in panel.targets]


def render_dashboard() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"
