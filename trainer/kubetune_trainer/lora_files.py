"""LoRA output files: diffusers' `pytorch_lora_weights.safetensors` and a kohya single file.

The diffusers file loads with `pipe.load_lora_weights(folder)`. The kohya file
(`lora_unet_*`/`lora_te*_*` keys with `lora_down`/`lora_up`/`alpha`, `ss_*` metadata) is
what AUTOMATIC1111 and ComfyUI load; its alpha is the job's alpha, so both files scale
the adapters the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import LoraSpec
from kubetune_trainer.models.family import Components

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def adapter_layers(components: Components, with_text_encoders: bool) -> dict[str, dict[str, Any]]:
    """PEFT adapter weights per module name ("unet" and the family's text encoder names)."""
    from peft.utils import get_peft_model_state_dict

    layers = {"unet": get_peft_model_state_dict(components.unet, save_embedding_layers=False)}
    if with_text_encoders:
        for name, encoder in components.named_text_encoders().items():
            layers[name] = get_peft_model_state_dict(encoder, save_embedding_layers=False)
    return {name: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()} for name, sd in layers.items()}


def _adapter_metadata(spec: LoraSpec, targets: list[str]) -> dict[str, Any]:
    return {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": targets,
            "lora_dropout": spec.dropout, "init_lora_weights": "gaussian"}


def write_diffusers(components: Components, layers: dict[str, dict[str, Any]], spec: LoraSpec,
                    folder: Path, job: FineTuneJob, step: int) -> Path:
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    family = components.family
    pipeline_class = getattr(diffusers, family.pipeline_class)
    kwargs: dict[str, Any] = {
        "unet_lora_layers": convert_state_dict_to_diffusers(layers["unet"]),
        "unet_lora_adapter_metadata": _adapter_metadata(spec, list(spec.target_modules)),
    }
    for name in family.text_encoder_names:
        if name in layers:
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers[name])
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
    prefixes = {"unet": "lora_unet", **dict(zip(family.text_encoder_names, family.kohya_text_prefixes, strict=True))}
    roots = dict(zip(family.text_encoder_names, family.kohya_text_roots, strict=True))
    save_file(kohya_state_dict(layers, spec.alpha, prefixes, roots), str(target), metadata=metadata)
    return target
