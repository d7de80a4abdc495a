"""Settings the trainer does not act on yet are named in the log, and only when the user set them."""

from __future__ import annotations

from trainer_support import job_document

from kubetune.api.validation import validate_document
from kubetune_trainer.assembly import total_steps, unsupported_settings


def _job(**spec: object):
    return validate_document(job_document("/m", "/d", "/o", **spec), mode="local").job


def test_defaults_raise_no_notices() -> None:
    assert unsupported_settings(_job()) == []


def test_explicit_settings_are_named() -> None:
    notes = unsupported_settings(_job(data={"aspectBuckets": True}, training={"cacheLatents": True}))
    assert [n.split(":")[0] for n in notes] == ["training.cacheLatents"]


def test_epochs_become_optimizer_steps() -> None:
    job = _job(training={"epochs": 3, "batchSize": 2, "gradientAccumulationSteps": 2, "maxSteps": None})
    assert total_steps(job, per_epoch=10) == 8
