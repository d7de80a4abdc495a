"""A job's identity: namespace/name plus a digest of exactly the fields that shape the weights."""

from __future__ import annotations

import pytest

from kubetune.api.identity import WEIGHT_FIELDS, JobIdentity, spec_digest
from kubetune.api.resource import FineTuneJob
from kubetune.api.uris import overlaps
from tests.unit.jobs import job


def _identity(doc: dict) -> JobIdentity:
    return JobIdentity.of(FineTuneJob.model_validate(doc))


BASE = _identity(job().obj())


@pytest.mark.parametrize(("path", "value"), [
    ("spec.training.learningRate", 3e-4), ("spec.training.seed", 7), ("spec.data.resolution", 768),
    ("spec.method.lora", {"rank": 4}), ("spec.model.uri", "s3://models/sd21/"), ("spec.data.uri", "s3://d/other/"),
    ("spec.training.batchSize", 4), ("spec.data.validationFraction", 0.1),
])
def test_weight_shaping_fields_change_the_digest(path: str, value: object) -> None:
    changed = _identity(job().set(path, value).obj())
    assert changed.spec_digest != BASE.spec_digest
    assert changed.same_job(BASE)


@pytest.mark.parametrize(("path", "value"), [
    ("spec.resources.nodes", 4), ("spec.resources.gpusPerNode", 8), ("spec.image", "registry/trainer:2"),
    ("spec.training.maxSteps", 5000), ("spec.training.mixedPrecision", "fp16"), ("spec.output.checkpointEvery", 7),
    ("spec.storage.maxConcurrency", 4), ("spec.data.loaderWorkers", 0), ("spec.validation.prompts", ["a dog"]),
])
def test_where_and_how_fast_leave_the_digest_alone(path: str, value: object) -> None:
    assert _identity(job().set(path, value).obj()) == BASE


def test_defaults_written_out_give_the_same_digest() -> None:
    explicit = job().set("spec.training.learningRate", 1e-4).set("spec.training.seed", 42).obj()
    assert _identity(explicit) == BASE


def test_name_and_namespace_are_part_of_the_identity() -> None:
    other = _identity(job().set("metadata.name", "other").obj())
    assert not other.same_job(BASE) and other.spec_digest == BASE.spec_digest
    local = _identity(job().drop("metadata.namespace").obj())
    assert local.namespace == "default"


def test_round_trip_through_a_manifest() -> None:
    assert JobIdentity.from_dict(BASE.as_dict()) == BASE
    assert JobIdentity.from_dict({"name": "x"}) is None
    assert JobIdentity.from_dict("team-a/corgi") is None
    assert str(BASE).startswith("team-a/corgi-lora (spec ")


def test_every_listed_field_exists_in_the_spec() -> None:
    doc = FineTuneJob.model_validate(job().obj()).spec.model_dump(mode="json", by_alias=True)
    for path in WEIGHT_FIELDS:
        node = doc
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, path
            node = node[part]
    assert len(spec_digest(FineTuneJob.model_validate(job().obj()).spec)) == 16


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("s3://out/a/", "s3://out/a", True), ("s3://out/a/", "s3://out/a/b/", True), ("s3://out/", "s3://out/a/", True),
    ("s3://out/a/", "s3://out/ab/", False), ("s3://out/a/", "s3://other/a/", False), ("pvc://c/x", "s3://c/x", False),
])
def test_output_prefixes_overlap(a: str, b: str, expected: bool) -> None:
    assert overlaps(a, b) is expected and overlaps(b, a) is expected
