"""One validation function for FineTuneJob documents, shared by the operator, `kubetune run`
and `kubetune validate`.

It reports every problem at once, each with the field path, what is wrong and what is
allowed. The schema's own checks (types, enums, bounds) come from pydantic, cross-field
rules from `rules.RULES`, and what no schema can express (URI schemes, which depend on
where the job runs) from `uris`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api import resource, uris
from kubetune.api.resource import FineTuneJob
from kubetune.api.rules import RULES
from kubetune.api.spec import FineTuneJobSpec


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class Validated:
    """The outcome: a typed job when there are no problems."""

    job: FineTuneJob | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


MERGE_TAG = "tag:yaml.org,2002:merge"
GOT_CHARS = 80
"""How much of a wrong value a problem quotes: enough to recognise it, not a whole prompt."""


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping names the same key twice: YAML parsers differ on which one wins, so refuse both."""


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a number, as kubectl does (YAML 1.2 floats), and refuses
    duplicate keys (PyYAML silently keeps the last one; kubectl refuses them too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *defaults`: merged keys may be overridden, as kubectl allows
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let SafeLoader report it as it does
                continue
            if first is not None:
                raise DuplicateKeyError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first on line {first.start_mark.line + 1}); keep only one",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def yaml_problem(exc: Exception) -> str:
    """A YAML error on one line: where (line, column) and what, without PyYAML's source excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_documents(text: str) -> list[Any]:
    """Every non-empty YAML document in `text`."""
    return [doc for doc in yaml.load_all(text, Loader=_Yaml12Loader) if doc is not None]


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class whose fields live at `loc` in a FineTuneJob document."""
    model: Any = FineTuneJob
    for part in loc:
        if isinstance(part, int):
            continue
        by_alias = {(f.alias or n): f for n, f in model.model_fields.items()}
        info = by_alias.get(part)
        if info is None:
            return None
        model = _unwrap_model(info.annotation)
        if model is None:
            return None
    return model


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _allowed_fields(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc)
    if model is None:
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    return "; allowed here: " + ", ".join(names)


def _describe(error: dict[str, Any]) -> Problem:
    loc = tuple(error["loc"])
    kind = error["type"]
    got = error.get("input")
    if kind == "missing":
        return Problem(_path(loc), "required field is missing")
    if kind == "extra_forbidden":
        return Problem(_path(loc), "unknown field" + _allowed_fields(loc[:-1]))
    message = error["msg"].replace("Input should be", "must be").replace("String should have", "must have")
    if kind == "literal_error":
        message = message.replace("must be", "must be one of:", 1)
    if got is not None and not isinstance(got, dict | list):
        shown = repr(got)
        message += f" (got {shown if len(shown) <= GOT_CHARS else shown[:GOT_CHARS - 3] + '...'})"
    return Problem(_path(loc), message)


def _walk(obj: Any, path: str) -> Iterator[tuple[Any, str]]:
    """Every model instance inside `obj`, with its document path."""
    if isinstance(obj, BaseModel):
        yield obj, path
        for name, info in type(obj).model_fields.items():
            yield from _walk(getattr(obj, name), f"{path}.{info.alias or name}")
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            yield from _walk(item, f"{path}[{i}]")


def rule_problems(spec: FineTuneJobSpec) -> list[Problem]:
    """Problems from the cross-field rules (the Python side of the CRD's CEL rules)."""
    problems = []
    for obj, path in _walk(spec, "spec"):
        for rule in RULES:
            if rule.on is type(obj) and rule.holds is not None and not rule.holds(obj):
                problems.append(Problem(path + rule.field_path, rule.message))
    return problems


def _uri_problems(spec: FineTuneJobSpec, mode: uris.Mode) -> list[Problem]:
    checks = [
        ("spec.model.uri", spec.model.uri, "model"),
        ("spec.data.uri", spec.data.uri, "data"),
        ("spec.output.uri", spec.output.uri, "output"),
    ]
    dreambooth = spec.method.dreambooth
    if dreambooth is not None and dreambooth.class_data_uri is not None:
        checks.append(("spec.method.dreambooth.classDataUri", dreambooth.class_data_uri, "data"))
    problems = [Problem(p, why) for p, uri, role in checks if (why := uris.uri_problem(uri, role, mode))]
    if spec.storage.endpoint is not None and (why := uris.endpoint_problem(spec.storage.endpoint)):
        problems.append(Problem("spec.storage.endpoint", why))
    if uris.is_within(spec.output.uri, spec.data.uri):
        problems.append(
            Problem(
                "spec.output.uri",
                "must not lie inside spec.data.uri: outputs would be read back as training data; choose another prefix",
            )
        )
    return problems


def semantic_problems(job: FineTuneJob, mode: uris.Mode) -> list[Problem]:
    """Problems no schema can express: rules, URI schemes for this mode, the name."""
    problems = rule_problems(job.spec) + _uri_problems(job.spec, mode)
    if why := uris.name_problem(job.metadata.name, resource.MAX_NAME_LENGTH):
        problems.append(Problem("metadata.name", why))
    return problems


def validate_document(doc: Any, mode: uris.Mode = "cluster") -> Validated:
    """Validate one parsed document; `mode` is where the job will run."""
    if not isinstance(doc, dict):
        return Validated(None, [Problem("", f"a FineTuneJob must be a mapping, got {type(doc).__name__}")])
    try:
        job = FineTuneJob.model_validate(doc)
    except ValidationError as exc:
        return Validated(None, [_describe(e) for e in exc.errors()])
    problems = semantic_problems(job, mode)
    return Validated(None if problems else job, problems)
