"""The FineTuneJob resource as a whole, and the names that identify it on the cluster."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES: tuple[str, ...] = ("ftj",)
MAX_NAME_LENGTH = 50
"""Leaves room for the suffixes of child objects and pod hostnames (63-character labels)."""


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta the project reads; everything else is kept as is."""

    model_config = ConfigDict(populate_by_name=True, extra="allow", frozen=True)

    name: str = Field(description="Job name.")
    namespace: str | None = Field(default=None, description="Namespace.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(BaseModel):
    """A FineTuneJob document."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True, strict=True)

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None

    def typed_status(self) -> FineTuneJobStatus:
        return FineTuneJobStatus.model_validate(self.status or {})
