"""Sample images during training from `spec.validation` prompts, uploaded under `<output>/samples/`.

`NullSampler` stands in when there are no prompts, so the loop always just asks `due()`.
Sampling runs under a forked RNG: it never changes the noise the next step draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.api.spec import SamplingSpec
from kubetune_trainer.models.family import Components
from kubetune_trainer.models.pipelines import build_pipeline, generate
from kubetune_trainer.storage.interface import ObjectStore, join_uri


class NullSampler:
    def due(self, step: int, last: bool) -> bool:
        return False

    def sample(self, step: int, denoiser: Any, publish: bool = True) -> list[dict[str, Any]]:
        return []


class Sampler:
    """Generates `imagesPerPrompt` images per prompt every `every` steps and at the end."""

    def __init__(self, spec: SamplingSpec, components: Components, store: ObjectStore, output_uri: str,
                 resolution: int, seed: int, scratch: Path) -> None:
        self.spec, self.components, self.store = spec, components, store
        self.root, self.resolution, self.seed, self.scratch = join_uri(output_uri, "samples"), resolution, seed, scratch

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.spec.every == 0

    def sample(self, step: int, denoiser: Any, publish: bool = True) -> list[dict[str, Any]]:
        import torch

        pipe = build_pipeline(self.components)
        setattr(pipe, self.components.family.denoiser_name, denoiser)
        refs = []
        self.scratch.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for p_index, prompt in enumerate(self.spec.prompts):
                generator = torch.Generator().manual_seed(self.seed + p_index)
                images = generate(self.components, pipe, prompt, num_inference_steps=self.spec.inference_steps,
                                  guidance_scale=self.spec.guidance_scale, height=self.resolution,
                                  width=self.resolution, num_images_per_prompt=self.spec.images_per_prompt,
                                  generator=generator)
                if not publish:  # another rank's copy of the images rank 0 keeps (a sharded denoiser's)
                    continue
                for i_index, image in enumerate(images):
                    name = f"step-{step}-{p_index}-{i_index}.png"
                    image.save(self.scratch / name)
                    uri = join_uri(self.root, name)
                    self.store.upload(self.scratch / name, uri)
                    refs.append({"step": step, "prompt": prompt, "uri": uri})
        return refs


def build_sampler(spec: SamplingSpec, **kwargs: Any) -> Sampler | NullSampler:
    return Sampler(spec, **kwargs) if spec.prompts else NullSampler()
