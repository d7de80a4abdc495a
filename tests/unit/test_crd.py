"""The committed CRD is exactly what the model generates, is structural, and agrees with the validator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.crd import build_crd, render_crd_yaml
from kubetune.api.validation import load_documents, validate_document
from tests.unit.crd_check import admit
from tests.unit.jobs import job
from tests.unit.test_validation import INVALID

CRD_PATH = Path("manifests/crd/kubetune.io_finetunejobs.yaml")
# Problems only the Python validator can see: URI schemes and spelling, the name pattern,
# output inside data. Everything else must be caught by the CRD as well.
PYTHON_ONLY = {
    "bad-uri-scheme",
    "local-path-on-cluster",
    "hf-dataset",
    "bad-bucket",
    "bad-hf-repo",
    "output-inside-data",
    "uppercase-name",
    "bad-endpoint",
    "wrong-api-version",
    "wrong-kind",
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_model(repo_root: Path) -> None:
    committed = (repo_root / CRD_PATH).read_text()
    assert committed == render_crd_yaml(), "manifests/crd is stale: run `make crd`"


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert "$ref" not in node and "title" not in node, path
        assert node.get("additionalProperties") is not False, path


def test_every_spec_field_is_described(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        if not path.endswith("[]") and not path.endswith("{}"):
            assert node.get("description"), f"{path} has no description"


def test_names_columns_and_subresource() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Progress", "Step", "Loss", "Age"]
    loss = version["additionalPrinterColumns"][3]
    assert loss["jsonPath"] == ".status.progress.smoothedLoss"  # the Loss column is the smoothed loss
    progress = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["progress"]["properties"]
    assert {"stepLoss", "smoothedLoss"} <= set(progress) and "loss" not in progress


def test_spec_model_method_data_are_immutable(schema: dict[str, Any]) -> None:
    rules = {r["rule"] for r in schema["properties"]["spec"]["x-kubernetes-validations"]}
    for section in ("model", "method", "data"):
        assert f"self.{section} == oldSelf.{section}" in rules


@pytest.mark.parametrize("example", sorted(Path("examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_pass_both_validators(example: Path, schema: dict[str, Any], repo_root: Path) -> None:
    for doc in load_documents((repo_root / example).read_text()):
        assert validate_document(doc).ok, validate_document(doc).problems
        assert admit(doc, schema) == []


def test_there_are_lora_dreambooth_and_full_examples(repo_root: Path) -> None:
    methods = {yaml.safe_load(p.read_text())["spec"]["method"]["type"] for p in (repo_root / "examples").glob("*.yaml")}
    assert {"lora", "dreambooth-lora", "full"} <= methods


@pytest.mark.parametrize(
    "doc", [c[1] for c in INVALID if c[0] not in PYTHON_ONLY], ids=[c[0] for c in INVALID if c[0] not in PYTHON_ONLY]
)
def test_crd_rejects_what_the_validator_rejects(doc: dict[str, Any], schema: dict[str, Any]) -> None:
    assert admit(doc, schema), "the CRD admits a job the validator refuses"


def test_crd_admits_the_minimal_job(schema: dict[str, Any]) -> None:
    assert admit(job().obj(), schema) == []
