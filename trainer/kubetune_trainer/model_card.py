"""A model card (`README.md`) beside the exported weights, so a run's result can be handed on as it is.

The card is what people read first, on the Hugging Face Hub or in a bucket, and what tools index.
Its YAML block (base model, tags, pipeline, trigger words, the sample images as a gallery) is
written by huggingface_hub's `ModelCardData` and its body rendered from a jinja template by
`ModelCard.from_template`, so `ModelCard.load` reads back exactly what was meant. The samples of
the exported (or else the newest) step are copied into `final/images/` through the storage
interface, so every widget path resolves beside the card wherever the folder goes.

The card names no storage endpoint, bucket, Secret or data location: the base model is its Hub repo
id (hf://), its folder name (s3://, pvc://) or its local path. The licence is left out of the
metadata: it is the base model's, which kubetune does not know, and the card says so.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import LoraSpec
from kubetune.api.uris import parse_uri
from kubetune_trainer.models.family import ModelFamily
from kubetune_trainer.storage.interface import ObjectInfo, ObjectStore, as_prefix, download_whole, join_uri

CARD_FILE = "README.md"
IMAGES_FOLDER = "images"
MAX_WIDGETS = 32
"""Sample images copied beside the card: each prompt's first image comes before any prompt's second."""

_SAMPLE_NAME = re.compile(r"^step-(\d+)-(\d+)-(\d+)\.png$")
METHOD_TAGS = {"lora": ["lora"], "dreambooth-lora": ["lora", "dreambooth"],
               "full": ["full-fine-tune"], "dreambooth": ["full-fine-tune", "dreambooth"]}
METHOD_NAMES = {"lora": "LoRA", "dreambooth-lora": "DreamBooth LoRA", "full": "full fine-tune",
                "dreambooth": "DreamBooth (full fine-tune)"}
EXPORT_REASONS = {"BestValidationLoss": "it had the lowest validation loss (`output.export: best`)",
                  "LastStep": "it is the last step trained"}


@dataclass(frozen=True)
class SampleImage:
    """One sample image beside the card: its name under `images/`, the step and prompt that made it."""

    name: str
    step: int
    prompt: str
    uri: str = ""

    @property
    def url(self) -> str:
        """The path relative to the card, as the Hub's `widget.output.url` wants it."""
        return f"{IMAGES_FOLDER}/{self.name}"


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says about one export, gathered once when the weights are written."""

    job: FineTuneJob
    family: ModelFamily
    """The base model's family: its names and Hub tags are the card's."""
    files: dict[str, str]
    """Output kind ("diffusers", "kohya", "pipeline") -> its path relative to the card."""
    steps_trained: int
    exported_step: int
    export_reason: str | None
    images_per_step: int
    training_images: int | None
    held_out_images: int
    samples: list[SampleImage]


def base_model_id(uri: str) -> str:
    """The base model as the Hub names it: the repo id of an hf:// URI; for object storage (s3://,
    pvc://) only the model folder's name, so no bucket or claim is named; a local path as given."""
    parsed = parse_uri(uri)
    if parsed.scheme in ("s3", "pvc"):
        return parsed.path.strip("/").rsplit("/", 1)[-1] or "base-model"
    if parsed.scheme != "hf":
        return uri
    return f"{parsed.location}/{parsed.path}".rstrip("/").split("@", 1)[0]


def base_model_revision(uri: str) -> str | None:
    """The `@revision` of an hf:// URI, if it pins one."""
    parsed = parse_uri(uri)
    if parsed.scheme != "hf" or "@" not in parsed.path:
        return None
    return parsed.path.split("@", 1)[1].rstrip("/")


def card_tags(method: str, family: ModelFamily) -> list[str]:
    """Hub tags: who made it, the library, the method, the model family, the task."""
    return ["kubetune", "diffusers", "diffusers-training", *METHOD_TAGS.get(method, []),
            *family.hub_tags, "text-to-image"]


def pick_samples(found: list[ObjectInfo], prompts: list[str], exported_step: int, last_step: int) -> list[SampleImage]:
    """The sample images to show: those of the exported step if it was sampled, else of the newest sampled
    step up to `last_step`; at most `MAX_WIDGETS`, each prompt's first image before any second one.

    Names follow the sampler (`step-N-P-I.png`); an image whose prompt index is no longer in the
    spec's prompts is left out, since its prompt is unknown.
    """
    by_step: dict[int, list[tuple[int, int, ObjectInfo]]] = {}
    for info in found:
        match = _SAMPLE_NAME.match(info.relative)
        if match is None:
            continue
        step, prompt, image = (int(group) for group in match.groups())
        if step <= last_step and prompt < len(prompts):
            by_step.setdefault(step, []).append((image, prompt, info))
    if not by_step:
        return []
    step = exported_step if exported_step in by_step else max(by_step)
    chosen = sorted(by_step[step], key=lambda entry: entry[:2])[:MAX_WIDGETS]
    return [SampleImage(info.relative, step, prompts[prompt], info.uri) for _, prompt, info in chosen]


def card_data(facts: CardFacts) -> Any:
    """The card's YAML block, as huggingface_hub's `ModelCardData`."""
    from huggingface_hub import ModelCardData

    spec = facts.job.spec
    dreambooth = spec.method.dreambooth
    widget = [{"text": sample.prompt, "output": {"url": sample.url}} for sample in facts.samples]
    return ModelCardData(
        base_model=base_model_id(spec.model.uri), library_name="diffusers", pipeline_tag="text-to-image",
        tags=card_tags(spec.method.type, facts.family), widget=widget or None,
        instance_prompt=dreambooth.instance_prompt if dreambooth else None,
    )


def render_card(facts: CardFacts) -> Any:
    """The whole card (`huggingface_hub.ModelCard`): metadata and the body from `CARD_TEMPLATE`."""
    from huggingface_hub import ModelCard

    return ModelCard.from_template(card_data(facts), template_str=CARD_TEMPLATE, **template_values(facts))


def template_values(facts: CardFacts) -> dict[str, Any]:
    """What the body's template reads besides the metadata."""
    spec = facts.job.spec
    dreambooth, scheme = spec.method.dreambooth, parse_uri(spec.model.uri).scheme
    base = base_model_id(spec.model.uri)
    trigger = dreambooth.instance_prompt if dreambooth else None
    is_lora = spec.method.type.endswith("lora")
    loadable = scheme in ("hf", "path", "file")  # `from_pretrained` takes it as written; s3:// and pvc:// it does not
    return {
        "name": facts.job.metadata.name, "method": METHOD_NAMES.get(spec.method.type, spec.method.type),
        "is_lora": is_lora, "lora": (spec.method.lora or LoraSpec()) if is_lora else None, "family": facts.family,
        "base": base, "base_uri": spec.model.uri if scheme not in ("s3", "pvc") else base, "hub": scheme == "hf",
        "revision": _python_str(base_model_revision(spec.model.uri)),
        "base_loadable": loadable, "base_code": _python_str(base if loadable else "path/to/base-model"),
        "variant": spec.model.variant, "files": facts.files, "trigger": trigger, "dreambooth": dreambooth,
        "training": spec.training, "scheduler": spec.training.lr_scheduler.type, "resolution": spec.data.resolution,
        "steps_trained": facts.steps_trained, "exported_step": facts.exported_step,
        "export_why": EXPORT_REASONS.get(facts.export_reason or "", facts.export_reason),
        "images_per_step": facts.images_per_step, "training_images": facts.training_images,
        "held_out": facts.held_out_images, "samples": facts.samples,
        "sample_step": facts.samples[0].step if facts.samples else None,
        "example_prompt": _python_str(trigger or next(iter(spec.validation.prompts), "a photo")),
        "lora_file": _python_str(facts.files.get("diffusers") or facts.files.get("kohya")),
    }


def _python_str(text: str | None) -> str | None:
    """`text` as a double-quoted Python string literal for the usage snippet (a JSON string is one)."""
    return None if text is None else json.dumps(text, ensure_ascii=False)


def training_images(data: Any) -> int | None:
    """The training images a batch stream draws from (DreamBooth: the instance images), through its wrappers
    (trace, prefetching workers, prior preservation); None if the stream does not say."""
    for _ in range(4):
        dataset = getattr(data, "dataset", None)
        if dataset is not None:
            return len(dataset.examples)
        data = getattr(data, "instance", None) or getattr(data, "stream", None)
        if data is None:
            return None
    return None


def publish_card(card: Any, samples: list[SampleImage], store: ObjectStore, final_uri: str, work: Path) -> str:
    """Copy the samples to `<final>/images/`, then write the card beside them (a card that exists has its
    images), then remove images an earlier export left there. Every transfer goes through `store`; returns
    the card's URI."""
    shutil.rmtree(work, ignore_errors=True)
    (work / IMAGES_FOLDER).mkdir(parents=True)
    for sample in samples:
        local = work / IMAGES_FOLDER / sample.name
        download_whole(store, sample.uri, local)
        store.upload(local, join_uri(final_uri, sample.url))
    card.save(work / CARD_FILE)
    uri = join_uri(final_uri, CARD_FILE)
    store.upload(work / CARD_FILE, uri)
    shown = {sample.name for sample in samples}
    for stale in store.list(as_prefix(join_uri(final_uri, IMAGES_FOLDER))):  # an earlier export's step
        if stale.relative not in shown:
            store.delete(stale.uri)
    shutil.rmtree(work, ignore_errors=True)
    return uri


def write_model_card(trainer: Any, folder: Path, written: dict[str, Path]) -> str:
    """The export's one call: gather what the card says from `trainer`, render it, publish it under
    `<output>/final/`. `trainer.outputs` may carry the exported `step` and its `reason` (best weights)."""
    parts, outputs = trainer.p, trainer.outputs or {}
    job = parts.job
    exported = int(outputs.get("step") or trainer.step)
    samples_uri = as_prefix(join_uri(job.spec.output.uri, "samples"))
    samples = pick_samples(parts.output_store.list(samples_uri), list(job.spec.validation.prompts), exported,
                           trainer.step)
    facts = CardFacts(
        job=job, family=parts.components.family,
        files={kind: path.relative_to(folder).as_posix() for kind, path in written.items()},
        steps_trained=trainer.step, exported_step=exported, export_reason=outputs.get("reason"),
        images_per_step=trainer.images_per_step(), training_images=training_images(parts.data),
        held_out_images=len(getattr(parts.validator, "examples", [])), samples=samples,
    )
    final = as_prefix(join_uri(job.spec.output.uri, "final"))
    return publish_card(render_card(facts), samples, parts.output_store, final, parts.scratch / "model-card")


# The card's jinja template: `card_data` is the YAML block, the rest comes from `template_values`.
# Jinja drops the template's last newline, so it ends with a blank line for the card to end with one.
CARD_TEMPLATE = """\
---
{{ card_data }}
---

# {{ name }}

{% if samples -%}
<Gallery />

{% endif -%}
A {{ method }} of {% if hub %}[`{{ base }}`](https://huggingface.co/{{ base }}){% else %}`{{ base }}`{% endif %}, \
trained by kubetune (FineTuneJob `{{ name }}`).
{%- if trigger %} Use the trigger words `{{ trigger }}` in your prompts.{% endif %}

## Training

| Setting | Value |
|---|---|
| Method | {{ method }}{% if lora %} (rank {{ lora.rank }}, alpha {{ lora.alpha }}\
{%- if lora.train_text_encoder %}, text encoders trained too{% endif %}){% endif %} |
| Base model | `{{ base_uri }}`{% if variant %} (variant `{{ variant }}`){% endif %} |
| Model family | {{ family.display_name }} |
| Steps trained | {{ steps_trained }} |
| Exported step | {{ exported_step }}{% if export_why %}: {{ export_why }}{% endif %} |
| Images per step | {{ images_per_step }} (batch size {{ training.batch_size }}, \
accumulation {{ training.gradient_accumulation_steps }}) |
| Learning rate | {{ training.learning_rate }} ({{ scheduler }}, optimizer {{ training.optimizer }}) |
| Resolution | {{ resolution }} |
| Precision | {{ training.mixed_precision }} |
| Training images | {% if training_images is not none %}{{ training_images }}{% else %}unknown{% endif %}\
{% if held_out %} ({{ held_out }} more held out for validation){% endif %} |
{%- if dreambooth %}
| Instance prompt | `{{ dreambooth.instance_prompt }}` |
{%- if dreambooth.prior_preservation %}
| Prior preservation | class prompt `{{ dreambooth.class_prompt }}`, loss weight {{ dreambooth.prior_loss_weight }} |
{%- endif %}
{%- endif %}
| Seed | {{ training.seed }} |
{% if samples %}
The gallery shows the samples of step {{ sample_step }}\
{%- if sample_step != exported_step %} (the newest sampled step; the exported weights are step \
{{ exported_step }}'s){% endif %}, in `images/`.
{% endif %}
## Use with diffusers

```python
import torch
from diffusers import DiffusionPipeline

{% if is_lora -%}
{% if not base_loadable %}# a local copy of the base model, {{ base_uri }}
{% endif -%}
pipe = DiffusionPipeline.from_pretrained({{ base_code }}\
{%- if revision %}, revision={{ revision }}{% endif %}, torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder", weight_name={{ lora_file }})
{%- else -%}
pipe = DiffusionPipeline.from_pretrained("path/to/this/folder/{{ files.pipeline }}", \
torch_dtype=torch.float16).to("cuda")
{%- endif %}
image = pipe({{ example_prompt }}).images[0]
```

## Use with AUTOMATIC1111 or ComfyUI

{% if files.kohya -%}
The single file `{{ files.kohya }}` is a \
{% if family.single_file_layout == "kohya" %}kohya-format\
{% else %}ComfyUI-ready (diffusers keys, alpha baked in){% endif %} \
LoRA for {{ family.short_display_name }}:

- AUTOMATIC1111 / Forge: put it in `stable-diffusion-webui/models/Lora/` and add `<lora:{{ name }}:1>` to the \
prompt{% if trigger %}, together with the trigger words `{{ trigger }}`{% endif %}.
- ComfyUI: put it in `ComfyUI/models/loras/` and load it with a *Load LoRA* node between the checkpoint \
and the sampler{% if trigger %}; write `{{ trigger }}` in the prompt{% endif %}.

Both need the base model itself as a checkpoint there.
{%- elif is_lora -%}
This export has no kohya single file; add `kohya` to the job's `spec.output.formats` for one.
{%- else -%}
{% if family.conversion_script -%}
This folder holds a diffusers pipeline. AUTOMATIC1111 and ComfyUI load single checkpoint files: convert it with \
diffusers' `scripts/{{ family.conversion_script }}`\
{%- else -%}
This folder holds a diffusers pipeline; diffusers ships no script that turns a {{ family.short_display_name }} \
pipeline into one checkpoint file, so load it with diffusers as above\
{%- endif -%}
{%- if trigger %}, and write the trigger words `{{ trigger }}` in your prompts{% endif %}.
{%- endif %}

## Licence

These weights are derived from the base model, `{{ base_uri }}`, \
and its licence applies to them. kubetune does not know that licence, so this card names none: \
read it before you share or use these weights, and add it as `license:` to the metadata above.

"""
