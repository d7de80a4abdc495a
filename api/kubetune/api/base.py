"""Shared base for every API type: camelCase on the wire, snake_case in Python, strict, read-only.

Strict mode mirrors what the Kubernetes API server accepts (no "5" for an integer), and
frozen instances make a validated spec a read-only config for the rest of the program.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A spec object: unknown fields are errors, values are immutable once validated."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        use_attribute_docstrings=False,
    )


class StatusModel(BaseModel):
    """A status object: written by the operator, so it may grow fields without breaking readers."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def section(model: type[BaseModel], description: str) -> Any:
    """A nested spec section that is always present; `default: {}` lets the API server fill it."""
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


QUANTITY_PATTERN = r"^([+]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Quantity = Annotated[
    str,
    StringConstraints(pattern=QUANTITY_PATTERN),
    BeforeValidator(_quantity_to_str),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
"""A Kubernetes resource quantity such as `8`, `500m`, `64Gi`; integers are accepted as written."""
