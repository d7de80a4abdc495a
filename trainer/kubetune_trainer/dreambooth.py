"""DreamBooth: the subject's images under the instance prompt, plus prior preservation.

Prior preservation trains on class images ("a photo of a dog") beside the subject's, so
the model keeps its idea of the class. Class images come from `classDataUri` and, where
fewer than `numClassImages` exist, are generated with the base model before any weight
changes. Every batch then holds instance and class images; the class part of the loss is
scaled by `priorLossWeight` and reported apart as the `prior` loss term.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubetune.api.spec import DreamBoothSpec, SamplingSpec
from kubetune_trainer.batches import BatchStream
from kubetune_trainer.data import Batch, Example
from kubetune_trainer.models.family import Components
from kubetune_trainer.models.pipelines import build_pipeline, generate

GENERATION_BATCH = 4


def generate_class_images(components: Components, prompt: str, count: int, folder: Path, resolution: int,
                          sampling: SamplingSpec, seed: int) -> list[Path]:
    """`count` images of `prompt` from the base model, reusing ones a previous attempt made."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"class-{i:05d}.png" for i in range(count)]
    todo = [i for i, path in enumerate(paths) if not path.is_file()]
    if not todo:
        return paths
    pipe = build_pipeline(components)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for start in range(0, len(todo), GENERATION_BATCH):
            chunk = todo[start : start + GENERATION_BATCH]
            images = generate(components, pipe, prompt, num_inference_steps=sampling.inference_steps,
                              guidance_scale=sampling.guidance_scale, height=resolution, width=resolution,
                              num_images_per_prompt=len(chunk),
                              generator=[torch.Generator().manual_seed(seed + i) for i in chunk])
            for index, image in zip(chunk, images, strict=True):
                tmp = paths[index].with_suffix(f".{os.getpid()}.tmp.png")
                image.save(tmp)
                os.replace(tmp, paths[index])
    return paths


def class_examples(spec: DreamBoothSpec, staged: list[Example], components: Components, folder: Path,
                   resolution: int, sampling: SamplingSpec, seed: int) -> list[Example]:
    """Up to `numClassImages` class examples: staged ones first, the rest generated."""
    prompt = spec.class_prompt or ""
    examples = [Example(ex.image, prompt, ex.size) for ex in staged[: spec.num_class_images]]
    missing = spec.num_class_images - len(examples)
    if missing > 0:
        paths = generate_class_images(components, prompt, missing, folder, resolution, sampling, seed)
        examples += [Example(path, prompt, (resolution, resolution)) for path in paths]
    return examples


class PriorPreservationStream:
    """Instance batches with a class batch appended; class images weigh `weight` in the loss."""

    def __init__(self, instance: BatchStream, prior: BatchStream, weight: float) -> None:
        self.instance, self.prior, self.weight = instance, prior, weight

    def per_epoch(self) -> int:
        return self.instance.per_epoch()

    @property
    def epoch(self) -> int:
        return self.instance.epoch

    def next_batch(self) -> Batch:
        import torch

        a, b = self.instance.next_batch(), self.prior.next_batch()
        return Batch(torch.cat([a.pixels, b.pixels]), a.captions + b.captions, a.sizes + b.sizes,
                     a.keys + b.keys, a.weights + [w * self.weight for w in b.weights],
                     terms=["instance"] * len(a.keys) + ["prior"] * len(b.keys))

    def close(self) -> None:
        self.instance.close()
        self.prior.close()

    def state_dict(self) -> dict[str, Any]:
        return {"instance": self.instance.state_dict(), "prior": self.prior.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.instance.load_state_dict(state["instance"])
        self.prior.load_state_dict(state["prior"])
