"""A FLUX.1-dev-sized transformer (12B parameters) takes LoRA steps at 1024x1024 on one GPU, through the
trainer's Flux family (packing, guidance) and flow-matching objective; images/s and peak memory are printed.

The weights are random and made on the GPU in bf16 (a CPU init of 12B parameters would take minutes).
The meta-device test beside it runs in CI: it keeps the shapes from rotting unseen.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from kubetune.api.spec import FlowMatchingSpec
from kubetune_trainer.models.family import Conditioning
from kubetune_trainer.models.flow import FlowMatching
from kubetune_trainer.models.flux import FAMILY as FLUX

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
RESOLUTION, T5_TOKENS, STEPS = 1024, 512, 4


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def _conditioning(device: Any) -> Conditioning:
    import torch

    t5 = torch.randn(1, T5_TOKENS, 4096, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device=device, dtype=torch.bfloat16)
    return Conditioning(t5, {"pooled_projections": pooled, "txt_ids": torch.zeros(T5_TOKENS, 3, device=device),
                             "guidance": torch.full((1,), 3.5, device=device)})


def test_the_flux_dev_size_has_twelve_billion_parameters_and_predicts_through_the_family() -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
        latents = torch.empty(1, 16, RESOLUTION // 8, RESOLUTION // 8)
        prediction = FLUX.predict(model, latents, torch.full((1,), 0.5), _conditioning("meta"))
    assert prediction.shape == latents.shape
    assert 11.8e9 < sum(p.numel() for p in model.parameters()) < 12.0e9


@pytest.mark.gpu
def test_a_flux_dev_sized_transformer_takes_lora_steps_at_1024_with_gradient_checkpointing() -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    started, default = time.perf_counter(), torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = FluxTransformer2DModel(**FLUX_DEV)
    finally:
        torch.set_default_dtype(default)
    torch.cuda.synchronize()
    built = time.perf_counter() - started
    model.requires_grad_(False)
    model.enable_gradient_checkpointing()
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    adapters = [p for p in model.parameters() if p.requires_grad]
    for param in adapters:
        param.data = param.data.float()
    before = [p.detach().clone() for p in adapters]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    objective = FlowMatching(_scheduler(), FlowMatchingSpec(), lambda latents: FLUX.tokens_of(latents))
    cond, losses, seconds = _conditioning(device), [], []
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(step)
        latents = torch.randn(1, 16, RESOLUTION // 8, RESOLUTION // 8, generator=generator).to(device)
        torch.cuda.synchronize()
        tick = time.perf_counter()
        noise, sigmas = objective.draw(latents, generator, 0.0, device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            prediction = FLUX.predict(model, objective.noisy(latents, noise, sigmas), sigmas, cond)
        loss = F.mse_loss(prediction.float(), objective.target(latents, noise, sigmas))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tick)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30
    images_per_second = (STEPS - 1) / sum(seconds[1:])
    print(f"flux-dev size: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters built on the GPU in "
          f"bf16 in {built:.1f} s; LoRA r16 at {RESOLUTION}px with gradient checkpointing: "
          f"{images_per_second:.2f} images/s (steps 2-{STEPS}), peak memory {peak:.1f} GiB, losses {losses}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(adapters, before, strict=True))
