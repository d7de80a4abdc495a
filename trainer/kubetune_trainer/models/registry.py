"""The model families this trainer supports, by diffusers pipeline class, and loading a model folder.

A new family is one new module in `kubetune_trainer.models` that defines `FAMILY`, an object that provides
`family.ModelFamily`; `FAMILIES` finds it there.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from kubetune.api.spec import ModelSpec
from kubetune_trainer import models
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.models.family import Components, ModelFamily


def _discover() -> dict[str, ModelFamily]:
    """Every `FAMILY` a module of `kubetune_trainer.models` defines, by pipeline class (in module-name order)."""
    found: dict[str, ModelFamily] = {}
    for module in sorted(info.name for info in pkgutil.iter_modules(models.__path__)):
        family = getattr(importlib.import_module(f"{models.__name__}.{module}"), "FAMILY", None)
        if family is not None:
            found[family.pipeline_class] = family
    return found


FAMILIES: dict[str, ModelFamily] = _discover()


def detect_family(path: Path) -> ModelFamily:
    """The family named by `_class_name` in `path/model_index.json`."""
    index = Path(path) / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model folder {path} has no readable model_index.json: "
                          f"{type(exc).__name__}") from exc
    family = FAMILIES.get(str(class_name))
    if family is None:
        raise ConfigError(f"model {path} is a {class_name}; supported: {', '.join(FAMILIES)}")
    return family


def load_components(path: Path, variant: str | None, model: ModelSpec | None = None) -> Components:
    """Detect the family and load every component, frozen; the method decides what trains."""
    components = detect_family(path).load(Path(path), variant, model)
    for module in components.modules().values():
        module.requires_grad_(False)
    return components
