"""An offline stand-in for the API server's admission of a FineTuneJob against the CRD.

It applies the schema's defaults, validates the OpenAPI schema with jsonschema and
evaluates every `x-kubernetes-validations` CEL rule with cel-python. The real API server
tests (integration tier) check the same CRD; this keeps the check in the fast tier.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Fill defaults the way the API server does: missing properties that have a default."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _cel_errors(value: Any, schema: dict[str, Any], path: str, env: celpy.Environment) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        program = env.program(env.compile(rule["rule"]))
        try:
            holds = program.evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as exc:  # the API server reports these as invalid too
            errors.append(f"{path}: rule {rule['rule']!r} failed to evaluate: {exc}")
            continue
        if not holds:
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += _cel_errors(value[name], sub, f"{path}.{name}", env)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _cel_errors(item, schema["items"], f"{path}[{i}]", env)
    return errors


def strict_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused, as `kubectl apply` (--validate=strict) does."""
    out = dict(schema)
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["properties"] = {k: strict_fields(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("items"), dict):
        out["items"] = strict_fields(out["items"])
    return out


def admit(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Errors the API server would report when creating `doc`; empty when it is admitted."""
    obj = apply_defaults(copy.deepcopy(doc), schema)
    strict = strict_fields(schema)
    strict["properties"]["metadata"] = schema["properties"]["metadata"]  # ObjectMeta is the server's own
    validator = jsonschema.Draft4Validator(strict)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    return errors or _cel_errors(obj, schema, "", celpy.Environment())
