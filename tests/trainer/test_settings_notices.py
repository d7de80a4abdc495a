"""Settings with consequences are named in the log, only when the user set them; epochs to steps."""

from __future__ import annotations

from trainer_support import job_document

from kubetune.api.validation import validate_document
from kubetune_trainer.assembly import setting_notices, total_steps


def _job(**spec: object):
    return validate_document(job_document("/m", "/d", "/o", **spec), mode="local").job


def test_defaults_raise_no_notices() -> None:
    assert setting_notices(_job()) == []


def test_explicit_settings_are_named() -> None:
    notes = setting_notices(_job(data={"aspectBuckets": True}, training={"cacheLatents": True}))
    assert [n.split(":")[0] for n in notes] == ["training.cacheLatents"]


def test_epochs_become_optimizer_steps() -> None:
    job = _job(training={"epochs": 3, "batchSize": 2, "gradientAccumulationSteps": 2, "maxSteps": None})
    assert total_steps(job, per_epoch=10) == 8
