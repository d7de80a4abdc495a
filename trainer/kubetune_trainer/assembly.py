"""Build a ready-to-run `Trainer` from a validated FineTuneJob: stage, load, wire components.

The order is the job's life: stage model and data, load the model family, let the method
pick what trains, then build accelerator, data stream, optimizer, schedule, checkpointer
and sampler, each from its own section of the spec.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import FULL_METHODS, TrainingSpec
from kubetune_trainer.batches import BatchStream, PrefetchedBatches, prefetched
from kubetune_trainer.caches.entries import DiskEntries
from kubetune_trainer.caches.latents import DiskLatentCache, NoLatentCache, cache_folder
from kubetune_trainer.caches.mirror import CacheMirror, NoMirror, build_mirror
from kubetune_trainer.caches.text import DiskTextCache, text_cache_folder
from kubetune_trainer.checkpoint import Checkpointer
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.data import Dataset, Example, load_dataset, split_dataset
from kubetune_trainer.dreambooth import PriorPreservationStream, class_examples
from kubetune_trainer.ema import build_ema
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.methods import TrainingMethod, build_method
from kubetune_trainer.models.family import Components
from kubetune_trainer.models.registry import load_components
from kubetune_trainer.objective import DiffusionObjective
from kubetune_trainer.optim import build_lr_scheduler, build_optimizer
from kubetune_trainer.ownership import claim_output
from kubetune_trainer.parts import StepHook
from kubetune_trainer.preflight import preflight_inputs, preflight_output
from kubetune_trainer.reporting import Reporter
from kubetune_trainer.sampling import build_sampler
from kubetune_trainer.sharding import (
    OFFLOAD_BACKEND,
    ShardedWeights,
    WholeWeights,
    held_bytes,
    offloaded,
    shard,
    single_process_group,
)
from kubetune_trainer.storage.interface import ObjectStore
from kubetune_trainer.storage.schemes import open_store, stage
from kubetune_trainer.trace import trace_from_env
from kubetune_trainer.trainer import StopRequest, Trainer, TrainerParts
from kubetune_trainer.validation import EarlyStopper, LossValidator, NullValidator

DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_accelerator(job: FineTuneJob) -> Any:
    """Mixed precision, accumulation and the process group's timeout (`runPolicy.processGroupTimeoutSeconds`).

    The timeout bounds how long a rank waits in a collective for a stuck or unreachable peer; its
    default (an hour) covers rank 0 staging a model or generating class images while the others wait.
    """
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = job.spec.training.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("training.mixedPrecision fp16 needs a GPU; use bf16 or no on CPU")
    if torch.cuda.is_available():  # TF32 matmuls for what autocast leaves in float32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timeout = timedelta(seconds=job.spec.run_policy.process_group_timeout_seconds)
    group = InitProcessGroupKwargs(timeout=timeout)
    if offloaded(job.spec.training) and torch.cuda.is_available():  # shards (and their grad norms) on the CPU
        group = InitProcessGroupKwargs(timeout=timeout, backend=OFFLOAD_BACKEND)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=job.spec.training.gradient_accumulation_steps,
                       kwargs_handlers=[group])


def total_steps(job: FineTuneJob, per_epoch: int) -> int:
    training = job.spec.training
    if training.max_steps is not None:
        return training.max_steps
    images_per_step = training.batch_size * training.gradient_accumulation_steps
    return max(1, math.ceil((training.epochs or 1) * per_epoch / images_per_step))


def setting_notices(job: FineTuneJob) -> list[str]:
    """Settings the user asked for whose consequences deserve a line in the log."""
    spec = job.spec
    random_crops = spec.training.cache_latents and not spec.data.center_crop
    dreambooth = spec.method.dreambooth is not None
    asked = [
        (spec.training, "cache_latents", random_crops and not dreambooth,
         "training.cacheLatents: random crops are cut from each image's cached latents, at whole latent cells"),
        (spec.training, "cache_latents", random_crops and dreambooth,
         "training.cacheLatents: DreamBooth crops are centred so that each image's latents can be reused"),
    ]
    return [text for section, name, active, text in asked if active and name in section.model_fields_set]


def _place(components: Components, accelerator: Any, precision: str, keep_denoiser: bool = False,
           trains_denoiser: bool = False) -> Any:
    """Frozen weights go to the device in the compute dtype; the VAE, and a denoiser the method will train whole
    (`trains_denoiser`), stay float32 exactly as loaded (a trip through bf16 would round their weights). With
    `keep_denoiser` the denoiser stays in host memory: FSDP moves each block to the device as it shards it, so
    no rank ever holds the whole model on its GPU."""
    import torch

    weight_dtype = getattr(torch, DTYPES[precision])
    for module in components.modules().values():
        if not (keep_denoiser and module is components.denoiser):
            module.to(accelerator.device)
        if module is components.vae or (trains_denoiser and module is components.denoiser):
            module.to(dtype=torch.float32)
            continue
        for param in module.parameters():
            if not param.requires_grad:
                param.data = param.data.to(weight_dtype)
    components.compute_dtype = weight_dtype  # `models.generate` runs pipelines under autocast in it
    return weight_dtype


def _validator(job: FineTuneJob, held_out: list[Example], objective: DiffusionObjective) -> Any:
    if not held_out:
        return NullValidator()
    spec = job.spec
    return LossValidator(held_out, objective, spec.data, spec.training.batch_size, spec.validation.every,
                         spec.training.seed)


def _stage_inputs(job: FineTuneJob, runtime: RuntimeConfig,
                  reporter: Reporter) -> tuple[Path, Path, Path | None]:
    """Model, data and (DreamBooth with classDataUri) class images as local folders."""
    reporter.phase("Staging")
    spec = job.spec
    wanted = {"model": spec.model.uri, "data": spec.data.uri}
    dreambooth = spec.method.dreambooth
    if dreambooth is not None and dreambooth.prior_preservation and dreambooth.class_data_uri:
        wanted["class-data"] = dreambooth.class_data_uri
    paths: dict[str, Path] = {}
    for what, uri in wanted.items():
        variant = spec.model.variant if what == "model" else None
        report = stage(uri, runtime.scratch / what, spec.storage, runtime.pvc_root, variant)
        reporter.staged(what, report)
        paths[what] = report.path
    return paths["model"], paths["data"], paths.get("class-data")


def _checkpoint_activations(module: Any) -> None:
    """Recompute `module`'s activations in the backward pass instead of keeping them (diffusers or transformers)."""
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
        return
    enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # adapters on a frozen encoder: its inputs need no grad


def _prepare(method: TrainingMethod, components: Components, gradient_checkpointing: bool) -> dict[str, Any]:
    """Let the method make its weights trainable; return the modules that now train, by name.

    They run in training mode: transformers checkpoints only there, and adapter dropout applies only there.
    """
    trained = method.prepare(components)
    for module in trained.values():
        module.train()
        if gradient_checkpointing:
            _checkpoint_activations(module)
    return trained


@contextmanager
def _denoiser_on(components: Components, device: Any, when: bool) -> Iterator[None]:
    """The denoiser on `device` for a while (`when` it is kept in host memory for sharding): DreamBooth's class
    images are generated with the whole base model."""
    if not when:
        yield
        return
    components.denoiser.to(device)
    try:
        yield
    finally:
        components.denoiser.to("cpu")


def _prior_examples(job: FineTuneJob, class_dir: Path | None, components: Components,
                    runtime: RuntimeConfig) -> list[Example]:
    """DreamBooth class images (staged, then generated by the untouched base model); none otherwise."""
    dreambooth = job.spec.method.dreambooth
    if dreambooth is None or not dreambooth.prior_preservation:
        return []
    class_spec = job.spec.data.model_copy(update={"uri": dreambooth.class_data_uri or "", "format": "auto"})
    staged = load_dataset(class_dir, class_spec, caption="").examples if class_dir else []
    return class_examples(dreambooth, staged, components, runtime.scratch / "class-images",
                          job.spec.data.resolution, job.spec.validation, job.spec.training.seed)


def _batches(job: FineTuneJob, dataset: Dataset, prior: list[Example], accelerator: Any,
             components: Components) -> BatchStream | PrefetchedBatches | PriorPreservationStream:
    """The rank's batch stream, rendered by `data.loaderWorkers` processes (split between instance and
    class images for DreamBooth with prior preservation)."""
    spec = job.spec
    update = {}
    if spec.method.dreambooth is not None:
        update["aspect_buckets"] = False  # instance and class images share each batch
        if spec.training.cache_latents:
            update["center_crop"] = True  # its batches join rendered pixels, which have no whole image to cache
    data_spec = spec.data.model_copy(update=update)
    latent_crop = components.family.latent_factor(components) if spec.training.cache_latents else 0

    def stream(examples: Dataset, seed: int, workers: int) -> BatchStream | PrefetchedBatches:
        batches = BatchStream(examples, data_spec, spec.training.batch_size, seed, accelerator.process_index,
                              accelerator.num_processes, components.family.size_multiple(components), latent_crop)
        return prefetched(batches, workers, spec.data.prefetch_batches)

    workers = spec.data.loader_workers
    if not prior:
        return stream(dataset, spec.training.seed, workers)
    weight = spec.method.dreambooth.prior_loss_weight if spec.method.dreambooth else 1.0
    return PriorPreservationStream(stream(dataset, spec.training.seed, workers - workers // 2),
                                   stream(Dataset(prior, 0, "class"), spec.training.seed + 1, workers // 2), weight)


def _mirrored(cache: DiskEntries, job: FineTuneJob, runtime: RuntimeConfig, accelerator: Any, store: ObjectStore,
              reporter: Reporter) -> CacheMirror | NoMirror:
    """The mirror of a scratch cache, which is first filled from it (one fetch per pod)."""
    mirror = build_mirror(cache, store, job.spec.output.uri, runtime.scratch / "tmp", accelerator.process_index,
                          reporter.notice)
    with accelerator.local_main_process_first():
        summary = mirror.fetch().summary()
    if summary:
        reporter.notice(summary)
    return mirror


def _latent_cache(job: FineTuneJob, runtime: RuntimeConfig, components: Components, accelerator: Any,
                  store: ObjectStore, reporter: Reporter) -> tuple[DiskLatentCache | NoLatentCache,
                                                                   CacheMirror | NoMirror]:
    spec = job.spec
    if not spec.training.cache_latents:
        return NoLatentCache(), NoMirror()
    cache = DiskLatentCache(cache_folder(runtime.scratch / "latents", components.vae, spec.data.uri,
                                         spec.data.resolution), runtime.scratch)
    return cache, _mirrored(cache, job, runtime, accelerator, store, reporter)


def _text_cache(job: FineTuneJob, runtime: RuntimeConfig, components: Components, accelerator: Any,
                store: ObjectStore, reporter: Reporter) -> CacheMirror | NoMirror:
    """While the method leaves every text encoder frozen, caption encodings go through a scratch cache."""
    if not components.text_encoders_frozen():
        return NoMirror()
    cache = DiskTextCache(text_cache_folder(runtime.scratch / "text", components), accelerator.device)
    components.text_cache = cache
    return _mirrored(cache, job, runtime, accelerator, store, reporter)


def _parallel(training: TrainingSpec, components: Components, trained: dict[str, Any], accelerator: Any,
              weight_dtype: Any) -> tuple[Any, Any, WholeWeights | ShardedWeights]:
    """The denoiser as the ranks train it and its optimizer (made after sharding, over the shards): replicated
    and wrapped by accelerate (ddp), or sharded with FSDP2 (fsdp)."""
    if training.parallelism == "fsdp":
        single_process_group(accelerator.device, offloaded(training))
        model_class = shard(components.denoiser, training.fsdp, weight_dtype)
        params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
        optimizer = accelerator.prepare_optimizer(build_optimizer(params, training))
        return components.denoiser, optimizer, ShardedWeights(components.denoiser, optimizer, model_class)
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    denoiser, optimizer = accelerator.prepare(components.denoiser, build_optimizer(params, training))
    return denoiser, optimizer, WholeWeights(trained)


def build_trainer(job: FineTuneJob, runtime: RuntimeConfig, reporter: Reporter,
                  hooks: list[StepHook] | None = None, stop: StopRequest | None = None) -> Trainer:
    from accelerate.utils import set_seed

    spec = job.spec
    accelerator, method = build_accelerator(job), build_method(job)
    trace = trace_from_env(accelerator.process_index)
    set_seed(spec.training.seed)
    for text in setting_notices(job):
        reporter.notice(text)
    preflight_inputs(job, runtime)  # model_index.json found, data listed: seconds, before any transfer
    claim = claim_output(job, runtime, reporter.notice)  # read-only: another job's output stops us first
    preflight_output(job, runtime)  # then the output takes a probe's write and delete
    with accelerator.local_main_process_first():  # one download per pod; the others find it staged
        model_dir, data_dir, class_dir = _stage_inputs(job, runtime, reporter)
    reporter.phase("Loading")
    instance_prompt = spec.method.dreambooth.instance_prompt if spec.method.dreambooth else None
    dataset, held_out = split_dataset(load_dataset(data_dir, spec.data, instance_prompt, reporter.data),
                                      spec.data.validation_fraction, spec.training.seed)
    components = load_components(model_dir, spec.model.variant, spec.model)
    sharded = spec.training.parallelism == "fsdp"
    weight_dtype = _place(components, accelerator, spec.training.mixed_precision, keep_denoiser=sharded,
                          trains_denoiser=spec.method.type in FULL_METHODS)
    generates = sharded and spec.method.dreambooth is not None and spec.method.dreambooth.prior_preservation
    with accelerator.local_main_process_first(), _denoiser_on(components, accelerator.device, generates):
        prior = _prior_examples(job, class_dir, components, runtime)
    trained = _prepare(method, components, spec.training.gradient_checkpointing)
    data = trace.wrap_data(_batches(job, dataset, prior, accelerator, components))
    steps = total_steps(job, data.per_epoch())
    denoiser, optimizer, weights = _parallel(spec.training, components, trained, accelerator, weight_dtype)
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    lr_scheduler = build_lr_scheduler(optimizer, spec.training, steps)
    store = trace.wrap_store(open_store(spec.output.uri, spec.storage, runtime.pvc_root))
    cache, mirror = _latent_cache(job, runtime, components, accelerator, store, reporter)
    text_mirror = _text_cache(job, runtime, components, accelerator, store, reporter)
    objective = DiffusionObjective(components, denoiser, spec.training, accelerator.device, weight_dtype, cache)
    return Trainer(TrainerParts(
        job=job, components=components, method=method, trained=trained, accelerator=accelerator, denoiser=denoiser,
        objective=objective, validator=_validator(job, held_out, objective),
        stopper=EarlyStopper(spec.training.early_stopping), ema=build_ema(spec.training.ema, params),
        data=data, optimizer=optimizer, lr_scheduler=lr_scheduler,
        # per rank: ranks of one pod share its scratch volume, and each downloads a checkpoint it resumes from
        checkpointer=Checkpointer(store, spec.output, runtime.scratch / "tmp" / f"rank-{accelerator.process_index}",
                                  claim),
        sampler=build_sampler(spec.validation, components=components, store=store, output_uri=spec.output.uri,
                              resolution=spec.data.resolution, seed=spec.training.seed,
                              scratch=runtime.scratch / "samples"),
        output_store=store, reporter=reporter, total_steps=steps, scratch=runtime.scratch, weights=weights,
        hooks=[mirror.step_hook, text_mirror.step_hook, *(hooks or []),
               *trace.hooks(weights.local_state, lambda: held_bytes(params, optimizer))],
        stop=stop or StopRequest(),
    ))
