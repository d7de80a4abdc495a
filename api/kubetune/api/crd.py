"""Generates the FineTuneJob CustomResourceDefinition from the typed API model.

Pydantic's JSON Schema is turned into a Kubernetes structural schema: references are
inlined, optional values lose their null branch (the API server prunes nulls), exclusive
bounds take the OpenAPI v3.0 form, and each class's cross-field rules become
`x-kubernetes-validations`.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune.api import resource
from kubetune.api.rules import RULES
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "format",
}
_RULES_BY_CLASS = {rule.on.__name__: [r for r in RULES if r.on is rule.on] for rule in RULES}


def _strip_null(node: dict[str, Any]) -> dict[str, Any]:
    branches = node.get("anyOf")
    if not branches:
        return node
    kept = [b for b in branches if b.get("type") != "null"]
    if len(kept) != 1:
        raise ValueError(f"union types cannot be expressed in a structural schema: {node}")
    merged = {k: v for k, v in node.items() if k != "anyOf"}
    return {**kept[0], **merged}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Return the structural-schema form of one JSON Schema node."""
    node = _strip_null(node)
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = _structural(defs[name], defs)
        target.update({k: v for k, v in node.items() if k in ("description", "default") and v is not None})
        rules = _RULES_BY_CLASS.get(name)
        if rules:
            target["x-kubernetes-validations"] = [r.as_validation() for r in rules]
        return target
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
        elif key not in _KEEP or (key == "default" and value is None):
            continue
        elif key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _structural(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if "const" in node:
        out["enum"] = [node["const"]]
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out["x-kubernetes-int-or-string"] = True
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    return out


def _schema_of(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    rules = _RULES_BY_CLASS.get(model.__name__)
    schema = _structural(raw, defs)
    if rules:
        schema["x-kubernetes-validations"] = [r.as_validation() for r in rules]
    return schema


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the served version."""
    spec = _schema_of(FineTuneJobSpec)
    status = _schema_of(FineTuneJobStatus)
    return {
        "type": "object",
        "description": "FineTuneJob fine-tunes a diffusion model (LoRA, full, DreamBooth) on GPU pods.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
            "kind": {"type": "string", "description": "FineTuneJob"},
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": resource.MAX_NAME_LENGTH}},
            },
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS: tuple[dict[str, str], ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of steps done",
    },
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.progress.smoothedLoss",
        "description": "Smoothed training loss",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.PLURAL}.{resource.GROUP}"},
        "spec": {
            "group": resource.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.KIND,
                "listKind": f"{resource.KIND}List",
                "plural": resource.PLURAL,
                "singular": resource.SINGULAR,
                "shortNames": list(resource.SHORT_NAMES),
                "categories": ["all", "kubetune"],
            },
            "versions": [
                {
                    "name": resource.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML committed under manifests/crd/."""
    header = "# Generated by `kubetune crd` from kubetune.api; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)
