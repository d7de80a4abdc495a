"""LoRA output files: diffusers' `pytorch_lora_weights.safetensors` and a single file (format "kohya").

The diffusers file loads with `pipe.load_lora_weights(folder)`. The single file is what
AUTOMATIC1111 and ComfyUI load. For the UNet families it is kohya's layout (`lora_unet_*`/
`lora_te*_*` keys with `lora_down`/`lora_up`/`alpha`, `ss_*` metadata) with the job's alpha. For
SD3 and Flux, whose diffusers keys ComfyUI reads directly but whose alpha (kept in the diffusers
file's metadata) it would not, it is the diffusers keys with alpha/rank baked into the up weights.
Either way both files scale the adapters the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import LoraSpec
from kubetune_trainer.models.family import Components

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def lora_text_encoders(components: Components) -> dict[str, Any]:
    """The loaded text encoders whose adapters the family's LoRA file carries (CLIP's, never T5's)."""
    named = components.named_text_encoders()
    return {name: named[name] for name in components.family.lora_text_encoder_names if name in named}


def adapter_layers(components: Components, with_text_encoders: bool) -> dict[str, dict[str, Any]]:
    """PEFT adapter weights per module name (the family's `denoiser_name` and text encoder names)."""
    from peft.utils import get_peft_model_state_dict

    denoiser = components.family.denoiser_name
    layers = {denoiser: get_peft_model_state_dict(components.denoiser, save_embedding_layers=False)}
    if with_text_encoders:
        for name, encoder in lora_text_encoders(components).items():
            layers[name] = get_peft_model_state_dict(encoder, save_embedding_layers=False)
    return {name: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()} for name, sd in layers.items()}


def _adapter_metadata(spec: LoraSpec, targets: list[str]) -> dict[str, Any]:
    return {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": targets,
            "lora_dropout": spec.dropout, "init_lora_weights": "gaussian"}


def file_keys(family: Any) -> Any:
    """How the family's diffusers LoRA file names adapter weights: the UNet families' diffusers names
    (`lora_linear_layer.down`), or PEFT's (`lora_A`), which the transformer families' loaders read."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers if family.lora_key_format == "diffusers" else dict


def write_diffusers(components: Components, layers: dict[str, dict[str, Any]], spec: LoraSpec,
                    folder: Path, job: FineTuneJob, step: int) -> Path:
    import diffusers

    family = components.family
    pipeline_class = getattr(diffusers, family.pipeline_class)
    denoiser = family.denoiser_name
    named = file_keys(family)
    kwargs: dict[str, Any] = {
        f"{denoiser}_lora_layers": named(layers[denoiser]),
        f"{denoiser}_lora_adapter_metadata": _adapter_metadata(spec, list(spec.target_modules)),
    }
    for name in family.text_encoder_names:
        if name in layers:
            kwargs[f"{name}_lora_layers"] = named(layers[name])
            kwargs[f"{name}_lora_adapter_metadata"] = _adapter_metadata(spec, list(family.text_lora_targets))
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, safe_serialization=True,
                                     **kwargs)
    return folder / DIFFUSERS_FILE


def kohya_state_dict(layers: dict[str, dict[str, Any]], alpha: float, prefixes: dict[str, str],
                     roots: dict[str, str]) -> dict[str, Any]:
    """PEFT keys (`<module>.lora_A.weight`) to kohya keys (`<prefix>_<module_>.lora_down.weight`).

    `prefixes` gives each module name's kohya prefix (`lora_unet`, the family's `kohya_text_prefixes`);
    `roots` the module path a module's kohya keys start with, put in front where its PEFT keys lack it
    (the family's `kohya_text_roots`; a module not named there keeps its keys' paths).
    """
    import torch

    out = {}
    for name, state in layers.items():
        root = roots.get(name, "")
        for key, tensor in state.items():
            module, _, kind = key.rpartition(".lora_")
            if not module.startswith(root):
                module = root + module
            stem = prefixes[name] + "_" + module.replace(".", "_")
            direction = "lora_down" if kind.startswith("A") else "lora_up"
            out[f"{stem}.{direction}.weight"] = tensor.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def write_kohya(components: Components, layers: dict[str, dict[str, Any]], spec: LoraSpec,
                folder: Path, job: FineTuneJob, step: int) -> Path:
    from safetensors.torch import save_file

    name = job.metadata.name
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(spec.alpha),
        "ss_base_model_version": components.family.kohya_base,
        "ss_output_name": name,
        "ss_steps": str(step),
        "ss_resolution": json.dumps([job.spec.data.resolution] * 2),
        "ss_learning_rate": str(job.spec.training.learning_rate),
        "ss_training_comment": f"kubetune FineTuneJob {name}",
    }
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.safetensors"
    family = components.family
    if family.single_file_layout == "diffusers":  # alpha baked in: the file's own scale is 1 (alpha = rank)
        metadata["ss_network_alpha"] = str(spec.rank)
        save_file(baked_state_dict(layers, spec.alpha / spec.rank), str(target), metadata=metadata)
        return target
    prefixes = {family.denoiser_name: "lora_unet",
                **dict(zip(family.text_encoder_names, family.kohya_text_prefixes, strict=True))}
    roots = dict(zip(family.text_encoder_names, family.kohya_text_roots, strict=True))
    save_file(kohya_state_dict(layers, spec.alpha, prefixes, roots), str(target), metadata=metadata)
    return target


def baked_state_dict(layers: dict[str, dict[str, Any]], scale: float) -> dict[str, Any]:
    """The transformer families' diffusers keys (`<module name>.<path>.lora_A/B.weight`) with `scale`
    (alpha/rank) multiplied into each up matrix: a reader that knows no alpha (ComfyUI, diffusers without
    metadata) applies the same update as the diffusers file does with its alpha."""
    out = {}
    for name, state in layers.items():
        for key, tensor in state.items():
            out[f"{name}.{key}"] = (tensor * scale if ".lora_B." in key else tensor).contiguous()
    return out
