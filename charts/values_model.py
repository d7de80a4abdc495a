"""The Helm chart's values as one typed model.

`values.yaml` (every value with a `# --` comment) and `values.schema.json` are both
generated from these classes by `make chart`, so the documentation, the defaults and the
schema Helm checks can never disagree; a test fails when the committed files drift.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel


class Values(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Image(Values):
    """A container image."""

    repository: str = Field(description="Image repository.")
    tag: str = Field(default="", description="Image tag; empty = the chart's appVersion.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy."
    )


class Resources(Values):
    """Requests and limits of the operator container."""

    requests: dict[str, str] = Field(
        default_factory=lambda: {"cpu": "100m", "memory": "192Mi"}, description="Resource requests."
    )
    limits: dict[str, str] = Field(default_factory=lambda: {"memory": "384Mi"}, description="Resource limits.")


class Operator(Values):
    """The operator Deployment."""

    replicas: int = Field(default=2, ge=1, le=10, description="Replicas; peering lets exactly one act at a time.")
    image: Image = Field(
        default_factory=lambda: Image(repository="ghcr.io/kubetune/kubetune-operator"), description="Operator image."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    resources: Resources = Field(default_factory=Resources, description="Operator container resources.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of the operator pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of the operator pods.")
    priority_class_name: str = Field(default="", description="PriorityClass of the operator pods.")


class Trainer(Values):
    """Defaults for trainer pods of FineTuneJobs that do not set spec.image."""

    image: Image = Field(
        default_factory=lambda: Image(repository="ghcr.io/kubetune/kubetune-trainer"),
        description="Default trainer image.",
    )


class ServiceMonitor(Values):
    """Prometheus Operator ServiceMonitor for the operator's /metrics."""

    enabled: bool = Field(default=False, description="Create a ServiceMonitor (needs the Prometheus Operator CRDs).")
    interval: str = Field(default="30s", pattern=r"^[0-9]+(ms|s|m|h)$", description="Scrape interval.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels, e.g. for a Prometheus selector.")


class PodMonitor(Values):
    """Prometheus Operator PodMonitor for trainer pods' /metrics."""

    enabled: bool = Field(default=False, description="Create a PodMonitor for trainer pods in all watched namespaces.")
    interval: str = Field(default="15s", pattern=r"^[0-9]+(ms|s|m|h)$", description="Scrape interval.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels, e.g. for a Prometheus selector.")


class Alerts(Values):
    """PrometheusRule with kubetune's alerts."""

    enabled: bool = Field(default=False, description="Create a PrometheusRule with the alerts.")
    stalled_for: str = Field(
        default="30m",
        pattern=r"^[0-9]+(s|m|h)$",
        description="Alert when a running job's step has not advanced for this long.",
    )
    restarts_threshold: int = Field(
        default=3, ge=1, description="Alert when a job restarted more than this many times."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels, e.g. for a Prometheus selector.")


class Dashboard(Values):
    """Grafana dashboard as a ConfigMap for the Grafana sidecar."""

    enabled: bool = Field(default=False, description='Create the dashboard ConfigMap (label grafana_dashboard: "1").')
    namespace: str = Field(default="", description="Namespace of the ConfigMap; empty = the release namespace.")


class Monitoring(Values):
    """Prometheus and Grafana integration."""

    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor, description="Operator ServiceMonitor.")
    pod_monitor: PodMonitor = Field(default_factory=PodMonitor, description="Trainer PodMonitor.")
    alerts: Alerts = Field(default_factory=Alerts, description="PrometheusRule alerts.")
    dashboard: Dashboard = Field(default_factory=Dashboard, description="Grafana dashboard.")


Namespace = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]


class Rbac(Values):
    """Where the operator may write."""

    cluster_wide: bool = Field(
        default=False,
        description=(
            "Watch every namespace, with write rights cluster-wide (ClusterRole); leave watchNamespaces empty. "
            "Off: Roles only in the release namespace and watchNamespaces."
        ),
    )


class AdmissionPolicy(Values):
    """ValidatingAdmissionPolicy on what the operator's ServiceAccount creates, updates and deletes."""

    enabled: bool = Field(
        default=True,
        description=(
            "Let the operator's ServiceAccount create, update and delete only labelled, FineTuneJob-owned "
            "children (an update only of an object already labelled as the same job's child): Jobs at least "
            "as strict as Pod Security baseline, non-root, without Secret volumes; headless Services "
            "(Kubernetes 1.30+)."
        ),
    )
    validation_actions: list[Literal["Deny", "Warn", "Audit"]] = Field(
        default_factory=lambda: ["Deny"],
        min_length=1,
        description="What a violation does: Deny refuses the request; Warn and Audit only report it.",
    )


class ChartValues(Values):
    """Values of the kubetune chart."""

    watch_namespaces: list[Namespace] = Field(
        default_factory=list,
        description="Namespaces the operator watches and writes in besides the release namespace (a Role in each).",
    )
    rbac: Rbac = Field(default_factory=Rbac, description="The operator's RBAC.")
    admission_policy: AdmissionPolicy = Field(
        default_factory=AdmissionPolicy, description="Admission policy on the operator's writes."
    )
    operator: Operator = Field(default_factory=Operator, description="The operator Deployment.")
    trainer: Trainer = Field(default_factory=Trainer, description="Trainer pod defaults.")
    monitoring: Monitoring = Field(default_factory=Monitoring, description="Prometheus and Grafana integration.")
