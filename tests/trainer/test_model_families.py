"""Each entry of the family registry is complete: keyed by its pipeline class, with one name and one
tokenizer per text encoder (and, for a kohya single file, one kohya prefix and root), and the names, Hub
tags and conversion script (where diffusers has one) its model card shows; and a tiny model of each family
loads as that family, its
modules named as the family says."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.lora_files import kohya_state_dict
from kubetune_trainer.models.registry import FAMILIES, detect_family, load_components


@pytest.mark.parametrize("pipeline_class", sorted(FAMILIES))
def test_an_entry_names_each_text_encoder_once(pipeline_class: str) -> None:
    family = FAMILIES[pipeline_class]
    assert family.pipeline_class == pipeline_class
    encoders = len(family.text_encoder_names)
    assert encoders == len(family.tokenizer_names)
    kohya = encoders if family.single_file_layout == "kohya" else 0
    assert kohya == len(family.kohya_text_prefixes) == len(family.kohya_text_roots)
    assert set(family.lora_text_encoder_names) <= set(family.text_encoder_names)
    assert family.text_lora_targets and family.kohya_base
    assert len({f.name for f in FAMILIES.values()}) == len(FAMILIES)


@pytest.mark.parametrize("pipeline_class", sorted(FAMILIES))
def test_an_entry_says_what_its_model_card_shows(pipeline_class: str) -> None:
    family = FAMILIES[pipeline_class]
    assert family.display_name and family.short_display_name
    assert family.hub_tags and all(tag == tag.strip().lower() and " " not in tag for tag in family.hub_tags)
    script = family.conversion_script  # "" where diffusers has no converter to one checkpoint file
    assert script == "" or (script.endswith(".py") and "/" not in script)
    others = [f for f in FAMILIES.values() if f is not family]
    for attribute in ("display_name", "short_display_name", "conversion_script"):
        value = getattr(family, attribute)
        assert value == "" or all(getattr(f, attribute) != value for f in others), attribute
    assert all(not set(f.hub_tags) & set(family.hub_tags) for f in others)


@pytest.mark.parametrize(("model", "name"), [("tiny_sd", "sd"), ("tiny_sdxl", "sdxl"), ("tiny_sd3", "sd3"),
                                             ("tiny_flux", "flux")])
def test_a_model_folder_loads_as_its_family(model: str, name: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(model)
    family = detect_family(path)
    components = load_components(path, None)
    assert family.name == name and components.family is family
    assert list(components.modules()) == [family.denoiser_name, "vae", *family.text_encoder_names]
    assert not any(p.requires_grad for module in components.modules().values() for p in module.parameters())
    assert family.size_multiple(components) % family.latent_factor(components) == 0


@pytest.mark.parametrize(("name", "key", "kohya"), [
    ("unet", "down.to_q.lora_A.weight", "lora_unet_down_to_q.lora_down.weight"),
    ("clip", "encoder.layers.0.q_proj.lora_B.weight",
     "lora_te1_text_model_encoder_layers_0_q_proj.lora_up.weight"),
    ("clip", "text_model.encoder.layers.0.q_proj.lora_A.weight",
     "lora_te1_text_model_encoder_layers_0_q_proj.lora_down.weight"),
    ("t5", "encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
     "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"),
])
def test_kohya_keys_start_at_the_encoders_root(name: str, key: str, kohya: str) -> None:
    """A family's `kohya_text_roots` go in front of its text encoders' keys once; other modules keep theirs."""
    import torch

    prefixes = {"unet": "lora_unet", "clip": "lora_te1", "t5": "lora_te2"}
    state = kohya_state_dict({name: {key: torch.ones(1)}}, 4.0, prefixes, {"clip": "text_model.", "t5": "encoder."})
    assert sorted(state) == sorted([kohya, kohya.rsplit(".", 2)[0] + ".alpha"])
