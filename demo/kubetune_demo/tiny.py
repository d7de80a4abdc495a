"""Tiny random-weight diffusion pipelines and synthetic datasets, built offline.

Tests and `kubetune demo` need real diffusers folders (model_index.json, unet/, vae/, ...)
without a model hub; these builders make them in well under a second at toy sizes.
The tokenizers are a character-level CLIP BPE vocabulary and a T5 unigram vocabulary written
here, not downloaded. SD3 and Flux get the real architectures at toy widths: 16-channel latents,
CLIP and T5 text encoders, a flow-matching scheduler configured as the published models' are.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

_CHARS = string.ascii_lowercase + string.digits + " ,.-'"
TEXT_HIDDEN = 32
T5_HIDDEN = 64
FAMILIES = ("sd", "sdxl", "sd3", "flux")


def write_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer whose vocabulary is single characters plus a few merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [c for c in _CHARS if c != " "]
    vocab_list = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    merges = ["#version: 0.2", "t h", "th e</w>"]
    vocab_list += ["th", "the</w>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return folder


def t5_tokenizer():
    """A T5 (unigram) tokenizer over single characters, with pad 0, end-of-sequence 1, unknown 2 as T5's."""
    from transformers import T5Tokenizer

    letters = [c for c in _CHARS if c != " "]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0),
             *((c, -2.0) for c in letters), *(("\u2581" + c, -3.0) for c in letters)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_HIDDEN, d_kv=16, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _flow_vae(shift: float, scaling: float):
    """16 latent channels, 4 pixels per latent cell (the published VAEs: 8), with the family's normalisation."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16), in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift, scaling_factor=scaling,
    )


def _flow_pipeline(family: str, tokenizer):
    """A random-weight SD3.5-Medium-shaped (MMDiT-X, qk-norm) or Flux.1-dev-shaped (guidance) pipeline."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    t5_tok = t5_tokenizer()
    vocab_size = len(tokenizer)
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_HIDDEN,
            pooled_projection_dim=2 * TEXT_HIDDEN, qk_norm="rms_norm", dual_attention_layers=(0,),
            pos_embed_max_size=64)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_flow_vae(0.0609, 1.5035), tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=t5_tok,
            text_encoder=CLIPTextModelWithProjection(_text_config(vocab_size, True)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab_size, True)),
            text_encoder_3=_t5(len(t5_tok)))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_flow_vae(0.1159, 0.3611),
                        tokenizer=tokenizer, text_encoder=CLIPTextModel(_text_config(vocab_size, True)),
                        tokenizer_2=t5_tok, text_encoder_2=_t5(len(t5_tok)))


def _text_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=TEXT_HIDDEN if projection else 512,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    )


def _unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN * (2 if sdxl else 1), attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=sdxl, **extra,
    )


def build_tiny_pipeline(folder: Path, family: str = "sd", seed: int = 0) -> Path:
    """Save a random-weight SD 1.x ("sd"), SDXL ("sdxl"), SD3.5 ("sd3") or Flux.1 ("flux") diffusers folder."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = write_tokenizer(Path(folder) / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    vocab_size = len(tokenizer)
    if family in ("sd3", "flux"):
        _flow_pipeline(family, tokenizer).save_pretrained(str(folder))
        _remove_tree(tok_dir)
        return Path(folder)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                              set_alpha_to_one=False)
    common = dict(unet=_unet(family == "sdxl"), vae=_vae(), scheduler=scheduler, tokenizer=tokenizer,
                  text_encoder=CLIPTextModel(_text_config(vocab_size, False)))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **common, tokenizer_2=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab_size, True)),
        )
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    _remove_tree(tok_dir)
    return Path(folder)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def build_image_dataset(folder: Path, count: int = 8, size: int = 64, layout: str = "imagefolder",
                        caption_column: str = "text", seed: int = 0) -> Path:
    """Write `count` synthetic PNGs with captions as `imagefolder` (metadata.jsonl) or `captions`."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(count):
        colour = colours[i % len(colours)]
        base = np.zeros((size, size, 3), dtype=np.uint8)
        base[..., "rgb".find(colour[0]) if colour[0] in "rgb" else 0] = 200
        noisy = np.clip(base + rng.integers(0, 55, base.shape), 0, 255).astype(np.uint8)
        name = f"img-{i:03d}.png"
        Image.fromarray(noisy).save(folder / name)
        caption = f"a {colour} square number {i}"
        if layout == "captions":
            (folder / f"img-{i:03d}.txt").write_text(caption, encoding="utf-8")
        rows.append({"file_name": name, caption_column: caption})
    if layout == "imagefolder":
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (folder / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return folder
