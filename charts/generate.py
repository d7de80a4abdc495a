"""Writes charts/kubetune/values.yaml and values.schema.json from `values_model.ChartValues`,
copies the CRD from manifests/crd into the chart, and renders the plain install
(manifests/operator.yaml) from the chart's defaults. Run by `make chart`; `--check` exits
non-zero when a committed file differs from what would be written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from charts.dashboard import render_dashboard
from charts.values_model import ChartValues
from kubetune.operator.permissions import CLUSTER_READ_RULES, LEASE_RULES, NAMESPACED_RULES
from tests.cluster.clusterbuild import helm_path

CHART = Path(__file__).resolve().parent / "kubetune"
MANIFESTS = CHART.parent.parent / "manifests"
CRD_SOURCE = MANIFESTS / "crd" / "kubetune.io_finetunejobs.yaml"
PLAIN_NAMESPACE = "kubetune-system"


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")


def _values_lines(model: BaseModel, indent: int) -> list[str]:
    lines = []
    pad = " " * indent
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        value = getattr(model, name)
        lines.append(f"{pad}# -- {info.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{key}:")
            lines += _values_lines(value, indent + 2)
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar(value)}")
    return lines


def render_values() -> str:
    header = ["# Generated from charts/values_model.py by `make chart`; edit the model, not this file.", ""]
    return "\n".join(header + _values_lines(ChartValues(), 0)) + "\n"


def _strip_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def render_schema() -> str:
    schema = ChartValues.model_json_schema(by_alias=True)
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    defs = schema.pop("$defs", {})
    schema["definitions"] = defs
    text = json.dumps(_strip_titles(schema), indent=2, sort_keys=True).replace("#/$defs/", "#/definitions/")
    return text + "\n"


def render_plain_install() -> str:
    """`helm template` of the chart's defaults: the operator part of `kubectl apply -k manifests/`."""
    cmd = [str(helm_path()), "template", "kubetune", str(CHART), "--namespace", PLAIN_NAMESPACE]
    rendered = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    header = "# Generated from charts/kubetune (default values) by `make chart`; do not edit by hand.\n"
    return header + rendered


def _rules_yaml(rules: tuple[dict[str, Any], ...]) -> str:
    return "# Generated from kubetune.operator.permissions by `make chart`.\n" + yaml.safe_dump(
        [dict(r) for r in rules], sort_keys=False, default_flow_style=None)


def rule_files() -> dict[Path, str]:
    """The operator's permissions, split by where the chart grants them: in each watched
    namespace (or cluster-wide with rbac.clusterWide), cluster-wide reads, the leader Lease."""
    return {
        CHART / "files" / "rules-namespaced.yaml": _rules_yaml(NAMESPACED_RULES),
        CHART / "files" / "rules-cluster.yaml": _rules_yaml(CLUSTER_READ_RULES),
        CHART / "files" / "rules-lease.yaml": _rules_yaml(LEASE_RULES),
    }


def chart_files() -> dict[Path, str]:
    return {
        **rule_files(),
        CHART / "values.yaml": render_values(),
        CHART / "values.schema.json": render_schema(),
        CHART / "crds" / CRD_SOURCE.name: CRD_SOURCE.read_text(),
        CHART / "files" / "dashboard.json": render_dashboard(),
    }


def _sync(files: dict[Path, str], check: bool) -> list[Path]:
    """Write `files` (or, with `check`, only list those that differ); returns the stale ones."""
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if not check:
        for path in stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path])
    return stale


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = _sync(chart_files(), check)
    # The plain install renders the chart as it now stands on disk.
    stale += _sync({MANIFESTS / "operator.yaml": render_plain_install()}, check)
    for path in stale:
        print(f"{path} {'is stale: run `make chart`' if check else 'written'}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
