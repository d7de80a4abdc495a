"""The model families this trainer supports, by diffusers pipeline class, and loading a model folder.

A new family is one more entry in `FAMILIES`: an object that provides `family.ModelFamily`.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.api.spec import ModelSpec
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.models.family import Components, ModelFamily
from kubetune_trainer.models.flux import Flux
from kubetune_trainer.models.sd import StableDiffusion
from kubetune_trainer.models.sd3 import StableDiffusion3
from kubetune_trainer.models.sdxl import StableDiffusionXL

FAMILIES: dict[str, ModelFamily] = {
    family.pipeline_class: family for family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())
}


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
