"""Random-weight diffusers pipelines at the sizes the GPU tier trains: toy, SD 1.5 at 512², SDXL at 1024².

Shared by `tests/gpu` and `bench/gpu_throughput.py`, so that a test's CPU twin and its CUDA
variant differ only in the size they ask for. The real sizes take the UNet, VAE and text-encoder
shapes of the published configs (SD 1.5: 860M-parameter UNet; SDXL: 2.6B) with the tiny
character tokenizer of `kubetune_demo.tiny`; nothing is downloaded. They are built on the GPU
in the training dtype (random initialisation of 2.6B parameters on CPU takes minutes) and saved
as a diffusers folder, which the trainer then stages and loads like any other model (trained
weights are loaded as float32, as from a published checkpoint).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSize:
    """One model the tier trains: its family, the resolution it trains at, and whether it needs a GPU."""

    name: str
    family: str
    resolution: int
    real: bool
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.name}-{self.resolution}"


SIZES = {
    "toy-sd": ModelSize("toy-sd", "sd", 64, real=False, batch_size=2),
    "toy-sdxl": ModelSize("toy-sdxl", "sdxl", 64, real=False, batch_size=2),
    "sd15": ModelSize("sd15", "sd", 512, real=True, batch_size=4),
    "sdxl": ModelSize("sdxl", "sdxl", 1024, real=True, batch_size=2),
}

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
"""stable-diffusion-v1-5's unet/config.json (the fields that differ from diffusers' defaults)."""

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
"""stable-diffusion-xl-base-1.0's unet/config.json (2816 = pooled 1280 + 6 time ids x 256)."""

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                     projection_dim=1280, hidden_act="gelu")


def build_model(folder: Path, size: ModelSize, device: str = "cuda", dtype: str = "bfloat16") -> Path:
    """Save a random-weight diffusers folder of `size` at `folder` and return it.

    Toy sizes come from `kubetune_demo.tiny` (CPU, float32, under a second); real sizes are
    initialised on `device` in `dtype` and written in that dtype.
    """
    if not size.real:
        from kubetune_demo.tiny import build_tiny_pipeline

        return build_tiny_pipeline(Path(folder), family=size.family)
    import torch

    with torch.device(device):
        torch.manual_seed(0)
        pipe = real_pipeline(Path(folder), size).to(dtype=getattr(torch, dtype))
    pipe.save_pretrained(str(folder))
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return Path(folder)


def real_pipeline(folder: Path, size: ModelSize) -> Any:
    """The pipeline of a real size, with random weights on the current default device (`meta` builds none)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from kubetune_demo.tiny import write_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(folder / "_tokenizer_src")))
    shutil.rmtree(folder / "_tokenizer_src", ignore_errors=True)

    def text_config(shape: dict) -> Any:
        return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, **shape)

    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    if size.family == "sd":
        return diffusers.StableDiffusionPipeline(
            unet=diffusers.UNet2DConditionModel(**SD15_UNET),
            vae=diffusers.AutoencoderKL(**SD_VAE, sample_size=512),
            text_encoder=CLIPTextModel(text_config(CLIP_L)), tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return diffusers.StableDiffusionXLPipeline(
        unet=diffusers.UNet2DConditionModel(**SDXL_UNET),
        vae=diffusers.AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(text_config(CLIP_L)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config(OPENCLIP_BIGG)), tokenizer_2=tokenizer,
        scheduler=scheduler)


def unet_flop_per_image(unet: Any, method: str, resolution: int) -> float:
    """Forward + backward FLOP of `unet` for one image, counted by torch.utils.flop_counter where it sits.

    `full`: every UNet weight needs a gradient; `lora`: the frozen base computes only the input
    gradients (the adapters' own FLOP are a rounding error at rank 4), as ANCHORS.md counts it.
    On the meta device this costs no arithmetic at all.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet.requires_grad_(method == "full")
    config, side = unet.config, resolution // 8
    options = {"device": unet.device, "dtype": unet.dtype}
    latents = torch.randn(1, config.in_channels, side, side, requires_grad=method != "full", **options)
    context = torch.randn(1, 77, config.cross_attention_dim, **options)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, **options),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], **options)}
    with FlopCounterMode(display=False) as counter:
        out = unet(latents, torch.tensor([500], device=unet.device), context, added_cond_kwargs=added,
                   return_dict=False)[0]
        out.float().square().mean().backward()
    return float(counter.get_total_flops())
