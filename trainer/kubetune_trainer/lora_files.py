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
from kubetune_trainer.models import Components

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_TE_PREFIXES = {1: ["lora_te"], 2: ["lora_te1", "lora_te2"]}


def adapter_layers(components: Components, with_text_encoders: bool) -> dict[str, dict[str, Any]]:
    """PEFT adapter weights per module name ("unet", "text_encoder", "text_encoder_2")."""
    from peft.utils import get_peft_model_state_dict

    layers = {"unet": get_peft_model_state_dict(components.unet, save_embedding_layers=False)}
    if with_text_encoders:
        names = ["text_encoder", "text_encoder_2"]
        for name, encoder in zip(names, components.text_encoders, strict=False):
            layers[name] = get_peft_model_state_dict(encoder, save_embedding_layers=False)
    return {name: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()} for name, sd in layers.items()}


def _adapter_metadata(spec: LoraSpec, targets: list[str]) -> dict[str, Any]:
    return {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": targets,
            "lora_dropout": spec.dropout, "init_lora_weights": "gaussian"}


def write_diffusers(components: Components, layers: dict[str, dict[str, Any]], spec: LoraSpec,
                    folder: Path, job: FineTuneJob, step: int) -> Path:
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    from kubetune_trainer.methods import TEXT_ENCODER_TARGETS

    pipeline_class = getattr(diffusers, components.family.pipeline_class)
    kwargs: dict[str, Any] = {
        "unet_lora_layers": convert_state_dict_to_diffusers(layers["unet"]),
        "unet_lora_adapter_metadata": _adapter_metadata(spec, list(spec.target_modules)),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in layers:
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers[name])
            kwargs[f"{name}_lora_adapter_metadata"] = _adapter_metadata(spec, TEXT_ENCODER_TARGETS)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, safe_serialization=True,
                                     **kwargs)
    return folder / DIFFUSERS_FILE


def kohya_state_dict(layers: dict[str, dict[str, Any]], alpha: float) -> dict[str, Any]:
    """PEFT keys (`<module>.lora_A.weight`) to kohya keys (`lora_unet_<module_>.lora_down.weight`)."""
    import torch

    encoders = [n for n in ("text_encoder", "text_encoder_2") if n in layers]
    prefixes = {"unet": "lora_unet"}
    prefixes.update(zip(encoders, KOHYA_TE_PREFIXES[2 if "text_encoder_2" in layers else 1], strict=False))
    out = {}
    for name, state in layers.items():
        for key, tensor in state.items():
            module, _, kind = key.rpartition(".lora_")
            if name != "unet" and not module.startswith("text_model."):
                module = "text_model." + module  # kohya names follow CLIPTextModel's classic layout
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
    save_file(kohya_state_dict(layers, spec.alpha), str(target), metadata=metadata)
    return target
