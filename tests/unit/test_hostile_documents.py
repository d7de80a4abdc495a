"""Documents written carelessly or on purpose: duplicate keys are refused with their line, and a
wrong type anywhere gives problems, never a crash (validate, run and the operator share the reader)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.validation import DuplicateKeyError, load_documents, validate_document
from kubetune.cli import main
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.job import load_job_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dreambooth-lora-sdxl.yaml"
WRONG_VALUES: tuple[Any, ...] = (5, "x", [], {}, None, True, [{"a": 1}], -1.5)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i))


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = _replaced(doc[path[0]], path[1:], value)
    return copy


def test_a_wrong_type_anywhere_is_a_problem_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    checked = 0
    for path in _paths(doc):
        for value in WRONG_VALUES:
            result = validate_document(_replaced(doc, path, value), mode="local")
            assert result.ok or all(str(p) for p in result.problems)
            checked += 1
    assert checked > 300
    file = tmp_path / "metadata-5.yaml"
    file.write_text(yaml.safe_dump(_replaced(doc, ("metadata",), 5)))
    assert main(["validate", str(file)]) == 1
    assert "metadata: must be a valid dictionary" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="metadata"):
        load_job_file(file, "local")


DUPLICATED = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: corgi}
spec:
  model: {uri: s3://models/sd15/}
  method: {type: lora}
  data: {uri: s3://data/corgis/}
  output: {uri: s3://out/corgi/}
  training:
    maxSteps: 100
    learningRate: 1e-4
    maxSteps: 5
"""


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DuplicateKeyError):
        load_documents(DUPLICATED)
    file = tmp_path / "dup.yaml"
    file.write_text(DUPLICATED)
    assert main(["validate", str(file)]) == 1
    err = capsys.readouterr().err
    assert "line 12" in err and "duplicate key 'maxSteps' (first on line 10)" in err
    with pytest.raises(ConfigError, match=r"line 12, column 5: duplicate key 'maxSteps'") as caught:
        load_job_file(file, "local")
    assert caught.value.exit_code == 78


def test_duplicate_top_level_keys_and_keys_in_lists_are_refused_too() -> None:
    with pytest.raises(DuplicateKeyError, match="'spec'"):
        load_documents("spec: {}\nspec: {}\n")
    with pytest.raises(DuplicateKeyError, match="'key'"):
        load_documents("tolerations:\n- {key: a, key: b}\n")


def test_the_same_key_in_sibling_mappings_is_fine() -> None:
    assert load_documents("a: {x: 1}\nb: {x: 2}\n") == [{"a": {"x": 1}, "b": {"x": 2}}]


def test_merge_keys_still_work_and_may_be_overridden() -> None:
    text = "defaults: &d {rank: 4, alpha: 4}\nlora:\n  <<: *d\n  alpha: 8\n"
    assert load_documents(text) == [{"defaults": {"rank": 4, "alpha": 4}, "lora": {"rank": 4, "alpha": 8}}]
    with pytest.raises(DuplicateKeyError, match="'alpha'"):
        load_documents("lora:\n  <<: {rank: 4}\n  alpha: 8\n  alpha: 9\n")


def test_an_over_long_prompt_is_refused_and_quoted_short() -> None:
    from tests.unit.jobs import job
    result = validate_document(job().set("spec.validation.prompts", ["a corgi", "x" * 1001]).obj())
    [problem] = result.problems
    assert str(problem).startswith("spec.validation.prompts[1]: must have at most 1000 characters (got 'xxx")
    assert str(problem).endswith("...)") and len(str(problem)) < 160
