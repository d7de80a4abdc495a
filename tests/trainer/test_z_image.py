"""Z-Image, the third transformer family, added as one file (`models/z_image.py`): a toy-sized Z-Image
pipeline (its Qwen3 text encoder, chat-template tokenizer, 16-channel VAE) trains LoRA end to end,
resumes to the uninterrupted run's weights, and its LoRA files load into `ZImagePipeline` and reproduce
the trainer's sample."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_FAILED
from kubetune_trainer.job import run_job


def _tokenizer() -> Any:
    """A byte-level BPE tokenizer over single characters (Qwen's kind) whose chat template is the message."""
    from transformers import Qwen2Tokenizer

    pieces = [*sorted(set(string.ascii_lowercase + string.digits + ",.-'")), "\u0120", "\u010a"]  # space, newline
    vocab = {piece: i for i, piece in enumerate(pieces)} | {"<|endoftext|>": len(pieces)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", unk_token=None, model_max_length=512)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


@pytest.fixture(scope="module")
def tiny_z_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                                     max_position_embeddings=512))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True,
                                           cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), latent_channels=16, layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    folder = tmp_path_factory.mktemp("tiny-z-image")
    ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder,
                   tokenizer=tokenizer, transformer=transformer).save_pretrained(str(folder))
    return folder


def _job(model: Path, data: Path, out: Path, **spec: Any) -> Any:
    return local_job(str(model), str(data), str(out), model={"maxSequenceLength": 32}, **spec)


@pytest.fixture(scope="module")
def z_run(tiny_z_image: Path, squares: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("z-run")
    job = _job(tiny_z_image, squares, root / "out", training={"maxSteps": 3, "learningRate": 1.0e-2},
               validation={"prompts": ["a red square"], "every": 100, "inferenceSteps": 2, "guidanceScale": 3.0})
    result = run_job(job, RuntimeConfig(scratch=root / "scratch", log_every=0))
    assert result.exit_code == 0, result.message
    return {"job": job, "result": result}


def _pipeline(model: Path) -> Any:
    import torch
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _output(pipe: Any) -> Any:
    """The transformer's prediction for fixed inputs, through the family's own call."""
    import torch

    from kubetune_trainer.models.family import Conditioning
    from kubetune_trainer.models.z_image import FAMILY

    generator = torch.Generator().manual_seed(3)
    latents, caption = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(5, 16, generator=generator)
    with torch.no_grad():
        return FAMILY.predict(pipe.transformer, latents, torch.tensor([0.3, 0.8]), Conditioning([caption, caption[:3]]))


def test_a_z_image_folder_is_its_own_family(tiny_z_image: Path) -> None:
    from kubetune_trainer.models.registry import detect_family, load_components

    components = load_components(tiny_z_image, None)
    assert detect_family(tiny_z_image).name == components.family.name == "z-image"
    assert list(components.modules()) == ["transformer", "vae", "text_encoder"]
    assert components.family.size_multiple(components) == 8  # the VAE's 4 pixels per cell, 2x2 patches


def test_captions_encode_as_the_pipeline_encodes_them(tiny_z_image: Path) -> None:
    import torch

    from kubetune.api.spec import ModelSpec
    from kubetune_trainer.models.registry import load_components

    components = load_components(tiny_z_image, None, ModelSpec(uri=str(tiny_z_image), maxSequenceLength=32))
    family = components.family
    ours = family.condition(components, family.encode_text(components, ["a red square", "blue"], "cpu"), [], "cpu")
    with torch.no_grad():
        theirs = _pipeline(tiny_z_image)._encode_prompt(["a red square", "blue"], "cpu", max_sequence_length=32)
    assert [tuple(t.shape) for t in ours.encoder_hidden_states] == [(12, 16), (4, 16)]
    for mine, pipeline in zip(ours.encoder_hidden_states, theirs, strict=True):
        torch.testing.assert_close(mine, pipeline)


def test_lora_trains_and_its_files_load_into_the_pipeline(z_run: dict[str, Any], tiny_z_image: Path) -> None:
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    lora = z_run["result"].progress["outputs"]["lora"]
    written = load_file(lora["diffusers"])
    assert written and all(key.startswith("transformer.") for key in written)
    pipe = _pipeline(tiny_z_image)
    before = _output(pipe)
    pipe.load_lora_weights(str(Path(lora["diffusers"]).parent))
    assert {f"transformer.{key}" for key in get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")} \
        == set(written)
    after = _output(pipe)
    assert not torch.allclose(before, after, atol=1e-4)
    single = _pipeline(tiny_z_image)
    single.load_lora_weights(lora["kohya"])
    torch.testing.assert_close(_output(single), after, rtol=1e-4, atol=1e-5)


def test_the_sample_is_reproduced_from_the_exported_lora(z_run: dict[str, Any], tiny_z_image: Path) -> None:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from PIL import Image

    from kubetune_trainer.models.pipelines import build_pipeline, generate
    from kubetune_trainer.models.registry import load_components

    job, result = z_run["job"], z_run["result"]
    components = load_components(tiny_z_image, None, job.spec.model)
    pipe = build_pipeline(components)
    pipe.load_lora_weights(str(Path(result.progress["outputs"]["lora"]["diffusers"]).parent))
    for module in (components.denoiser, *components.text_encoders):  # the trainer's bf16: adapters stay float32
        for name, param in module.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(torch.bfloat16)
    components.compute_dtype = torch.bfloat16
    Accelerator(mixed_precision="bf16", cpu=True).prepare(components.denoiser)
    validation = job.spec.validation
    image = generate(components, pipe, validation.prompts[0], height=64, width=64,
                     num_inference_steps=validation.inference_steps, guidance_scale=validation.guidance_scale,
                     generator=torch.Generator().manual_seed(job.spec.training.seed))[0]
    written = np.asarray(Image.open(result.progress["samples"][-1]["uri"]).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - written).max() <= 1


def test_a_killed_lora_run_resumes_to_the_uninterrupted_runs_weights(tiny_z_image: Path, squares: Path,
                                                                      tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    def crash(record: Any) -> None:
        if record.step == 3:
            raise RuntimeError("killed after step 3")

    training = {"maxSteps": 4, "gradientAccumulationSteps": 2}
    straight = run_job(_job(tiny_z_image, squares, tmp_path / "a", training=training),
                       RuntimeConfig(scratch=tmp_path / "sa", log_every=0))
    crashed = run_job(_job(tiny_z_image, squares, tmp_path / "b", training=training),
                      RuntimeConfig(scratch=tmp_path / "sb1", log_every=0), hooks=[crash])
    assert (straight.exit_code, crashed.exit_code) == (0, EXIT_FAILED)
    resumed = run_job(_job(tiny_z_image, squares, tmp_path / "b", training=training),
                      RuntimeConfig(scratch=tmp_path / "sb2", log_every=0))
    assert resumed.exit_code == 0, resumed.message
    want = load_file(straight.progress["outputs"]["lora"]["diffusers"])
    got = load_file(resumed.progress["outputs"]["lora"]["diffusers"])
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


def test_text_encoder_adapters_are_refused_by_name(tiny_z_image: Path, squares: Path, tmp_path: Path) -> None:
    job = _job(tiny_z_image, squares, tmp_path / "out", method={"type": "lora", "lora": {"trainTextEncoder": True}})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == EXIT_CONFIG and "method.lora.trainTextEncoder" in result.message
