"""The FineTuneJob API (kubetune.io/v1alpha1): typed spec and status, the trainer's report, CRD, validation.

This package imports nothing else from the project, so the operator, the trainer and
the CLI can all depend on it.
"""

from kubetune.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION, FineTuneJob
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
]
