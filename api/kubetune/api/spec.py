"""The FineTuneJob spec: the one typed source of truth for what users write.

The CRD's openAPIV3Schema, the validator and the trainer's configuration all come from
these classes; descriptions here are what `kubectl explain ftj.spec...` prints.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from kubetune.api.base import ApiModel, Quantity, section

MethodType = Literal["lora", "full", "dreambooth", "dreambooth-lora"]
LORA_METHODS: tuple[str, ...] = ("lora", "dreambooth-lora")
DREAMBOOTH_METHODS: tuple[str, ...] = ("dreambooth", "dreambooth-lora")
FULL_METHODS: tuple[str, ...] = ("full", "dreambooth")


class SecretKeyRef(ApiModel):
    """One key of a Secret in the job's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(default="HF_TOKEN", min_length=1, max_length=253, description="Key within the Secret.")


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    uri: str = Field(
        min_length=1,
        description=(
            "Diffusers model folder containing model_index.json. Schemes: s3://bucket/prefix/, "
            "hf://org/name[@revision], pvc://claim/path; in local mode also file:// or a plain "
            "path. The family (SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1) is detected from model_index.json."
        ),
    )
    variant: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Diffusers weight variant to load, e.g. fp16 (files named *.fp16.safetensors); "
            "hf:// downloads fetch only that variant's weight files."
        ),
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret key holding a Hugging Face access token for gated or private hf:// repositories "
            "(passed to the trainer as HF_TOKEN); in local mode the HF_TOKEN environment variable is used."
        ),
    )
    max_sequence_length: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description=(
            "Transformer families: caption tokens their long text encoder (T5; Z-Image's Qwen3) reads, longer "
            "captions cut; omitted = the family's default (SD3 256, Flux.1 512). Its cost grows with it. "
            "The UNet families reject it."
        ),
    )
    without_t5: bool = Field(
        default=False,
        description=(
            "SD3/SD3.5: leave the T5 text encoder out (it is not loaded; the transformer gets zeros in its "
            "place, as diffusers' pipeline does without it), saving its memory and encoding time. "
            "Other families reject it."
        ),
    )


class LoraSpec(ApiModel):
    """Low-rank adapter settings for the lora and dreambooth-lora methods."""

    rank: int = Field(default=16, ge=1, le=1024, description="Rank r of the adapter matrices.")
    alpha: float = Field(
        default=16.0, gt=0, le=4096, description="Scaling numerator: the update is scaled by alpha/rank."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default=["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        max_length=64,
        description="Denoiser (UNet or transformer) module names (suffixes) that receive adapters.",
    )
    train_text_encoder: bool = Field(
        default=False, description="Also train adapters on the text encoder(s) (q/k/v/out projections)."
    )


class DreamBoothSpec(ApiModel):
    """Subject-driven fine-tuning with optional prior preservation."""

    instance_prompt: str = Field(
        min_length=1, description='Prompt naming the subject with a rare token, e.g. "a photo of sks dog".'
    )
    class_prompt: str | None = Field(
        default=None,
        min_length=1,
        description='Prompt for the generic class, e.g. "a photo of a dog"; needed for prior preservation.',
    )
    prior_preservation: bool = Field(
        default=True, description="Add the class-image loss that keeps the model's prior for the class."
    )
    class_data_uri: str | None = Field(
        default=None,
        min_length=1,
        description="Class images (same schemes as data.uri); generated with the base model when missing.",
    )
    num_class_images: int = Field(
        default=200, ge=1, le=100000, description="Class images to use (generated up to this count)."
    )
    prior_loss_weight: float = Field(
        default=1.0, ge=0.0, le=100.0, description="Weight of the prior-preservation loss term."
    )


class MethodSpec(ApiModel):
    """How the model is fine-tuned. Immutable after creation."""

    type: MethodType = Field(
        description=(
            "lora: adapters on the UNet; full: all UNet weights; dreambooth: full fine-tune on a "
            "subject; dreambooth-lora: DreamBooth with adapters."
        )
    )
    lora: LoraSpec | None = Field(
        default=None, description="Adapter settings for lora and dreambooth-lora (defaults apply when omitted)."
    )
    dreambooth: DreamBoothSpec | None = Field(default=None, description="Required for dreambooth and dreambooth-lora.")


class DataSpec(ApiModel):
    """The training images and captions. Immutable after creation."""

    uri: str = Field(
        min_length=1,
        description="Dataset folder: s3://bucket/prefix/, pvc://claim/path; in local mode also file:// or a path.",
    )
    format: Literal["auto", "imagefolder", "captions"] = Field(
        default="auto",
        description=(
            "imagefolder: images plus metadata.jsonl with file_name and a caption column; "
            "captions: each image with a same-name .txt caption; auto: detect."
        ),
    )
    caption_column: str = Field(
        default="text", min_length=1, description="Caption column of metadata.jsonl (imagefolder)."
    )
    resolution: int = Field(default=512, ge=64, le=4096, description="Training resolution in pixels; a multiple of 8.")
    aspect_buckets: bool = Field(
        default=True, description="Group images into aspect-ratio buckets of the same pixel budget."
    )
    random_flip: bool = Field(default=True, description="Flip images horizontally at random.")
    center_crop: bool = Field(default=False, description="Crop to the centre instead of at random.")
    loader_workers: int = Field(
        default=2,
        ge=0,
        le=64,
        description=(
            "Processes per trainer process that decode and augment images ahead of the training loop, "
            "sharing batches through /dev/shm (resources.sharedMemory); 0 = in the training process."
        ),
    )
    prefetch_batches: int = Field(
        default=2, ge=1, le=64, description="Batches each loader worker prepares ahead (with loaderWorkers > 0)."
    )
    max_skipped: int = Field(
        default=0,
        ge=0,
        le=10_000_000,
        description=(
            "Images that may be skipped as unreadable, missing or badly captioned before the job fails "
            "(exit 78, naming them); skipped images are counted and named in the log and the status."
        ),
    )
    validation_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Fraction of images held out for validation loss and early stopping (0 = none).",
    )


class SecretRef(ApiModel):
    """A Secret in the job's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")


class StorageSpec(ApiModel):
    """S3-compatible connection used for every s3:// URI of the job."""

    endpoint: str | None = Field(
        default=None,
        min_length=1,
        description="S3 endpoint URL, e.g. http://minio.storage:9000; omitted = AWS.",
    )
    region: str = Field(default="us-east-1", min_length=1, description="Region name.")
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        default="auto", description="Bucket addressing: path (MinIO and most on-prem), virtual, auto."
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description=(
            "Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN; "
            "omitted = the pod's ambient identity (e.g. IRSA)."
        ),
    )
    max_concurrency: int = Field(default=16, ge=1, le=256, description="Parallel transfers when staging and uploading.")


class OutputSpec(ApiModel):
    """Where checkpoints, samples and the trained weights go."""

    uri: str = Field(
        min_length=1,
        description="Output prefix: s3://bucket/prefix/ or pvc://claim/path; in local mode also a path.",
    )
    checkpoint_every: int = Field(
        default=500, ge=1, le=10_000_000, description="Save a resumable checkpoint every N steps."
    )
    keep_checkpoints: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Keep the newest N complete checkpoints, plus the best validation step's with export best.",
    )
    export: Literal["best", "last"] = Field(
        default="best",
        description=(
            "Which weights the outputs hold. best: with a validation split (data.validationFraction > 0), "
            "those of the step with the lowest validation loss, whose checkpoint is kept out of rotation; "
            "without one, the last step's. last: always the last step's."
        ),
    )
    formats: list[Literal["diffusers", "kohya"]] = Field(
        default_factory=list,
        max_length=2,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description=(
            "Output formats. Empty = the method's defaults: LoRA methods write the diffusers "
            "file and the kohya single file (A1111/ComfyUI); full methods a diffusers pipeline."
        ),
    )


class LrSchedulerSpec(ApiModel):
    """Learning-rate schedule (diffusers' get_scheduler)."""

    type: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = Field(
        default="constant", description="Schedule shape."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps.")
    num_cycles: int = Field(
        default=1, ge=1, le=1000, description="cosine_with_restarts: hard restarts over the training steps."
    )
    power: float = Field(
        default=1.0, gt=0.0, le=10.0, description="polynomial: power of the decay (1.0 = linear decay to zero)."
    )


class EmaSpec(ApiModel):
    """Exponential moving average of the trained weights (full fine-tunes)."""

    decay: float = Field(default=0.9999, gt=0.0, lt=1.0, description="EMA decay per optimizer step.")


class EarlyStoppingSpec(ApiModel):
    """Stop when validation loss stops improving."""

    patience: int = Field(default=3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest decrease that counts as improvement.")


class FlowMatchingSpec(ApiModel):
    """The flow-matching objective (SD3, Flux, ...): which noise levels training draws and how it weights them."""

    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = Field(
        default="logit_normal",
        description="Density of the noise level sigma: logit-normal (SD3's paper), mode (with modeScale), uniform.",
    )
    logit_mean: float = Field(default=0.0, ge=-10.0, le=10.0, description="Mean of the logit-normal density.")
    logit_std: float = Field(default=1.0, gt=0.0, le=10.0, description="Standard deviation of the logit-normal.")
    mode_scale: float = Field(default=1.29, ge=-10.0, le=10.0, description="Scale of the mode density.")
    shift: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description=(
            "Shift of the drawn sigmas towards noise, sigma' = s*sigma/(1+(s-1)*sigma); omitted = the base "
            "model's scheduler: its fixed shift (SD3: 3.0), or with dynamic shifting (Flux.1-dev) the "
            "resolution-dependent shift its pipeline samples with."
        ),
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        default="none", description="Weight of each image's loss by its sigma: none, sigma_sqrt or cosmap."
    )
    guidance: float = Field(
        default=3.5,
        ge=0.0,
        le=100.0,
        description="Flux.1-dev (guidance-distilled): the guidance value its transformer reads in training.",
    )


class FsdpSpec(ApiModel):
    """Fully sharded data parallel (PyTorch FSDP2) settings, for `training.parallelism: fsdp`."""

    reshard_after_forward: bool = Field(
        default=True,
        description=(
            "Free each block's gathered weights after its forward pass and gather them again for the backward "
            "(FULL_SHARD); false keeps them until the backward (SHARD_GRAD_OP: more memory, less communication)."
        ),
    )
    cpu_offload: bool = Field(
        default=False,
        description="Keep the sharded weights, gradients and optimizer state in host memory (needs GPUs).",
    )


class TrainingSpec(ApiModel):
    """Optimisation settings. Set exactly one of maxSteps and epochs."""

    max_steps: int | None = Field(default=None, ge=1, le=10_000_000, description="Optimizer steps to train.")
    epochs: int | None = Field(default=None, ge=1, le=100_000, description="Passes over the data to train.")
    batch_size: int = Field(default=1, ge=1, le=4096, description="Images per GPU (or per process) per step.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    learning_rate: float = Field(default=1.0e-4, gt=0.0, le=10.0, description="Peak learning rate.")
    lr_scheduler: LrSchedulerSpec = section(LrSchedulerSpec, "Learning-rate schedule.")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = Field(
        default="adamw", description="adamw (torch fused where available), adamw8bit (bitsandbytes), prodigy."
    )
    weight_decay: float = Field(default=1.0e-2, ge=0.0, le=1.0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm; 0 = off.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="bf16", description="Autocast precision; fp16 needs a GPU."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    snr_gamma: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="Min-SNR loss weighting gamma (5.0 is typical; UNet families only); omitted = off.",
    )
    noise_offset: float = Field(default=0.0, ge=0.0, le=1.0, description="Noise offset for darker/brighter images.")
    parallelism: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description=(
            "ddp: every rank holds the whole model and optimizer state; fsdp: a full fine-tune's weights, "
            "gradients and optimizer state are sharded across the ranks (FSDP2), and each rank writes its own "
            "checkpoint shards."
        ),
    )
    fsdp: FsdpSpec | None = Field(default=None, description="FSDP settings (parallelism fsdp); omitted = defaults.")
    flow_matching: FlowMatchingSpec | None = Field(
        default=None,
        description=(
            "Flow-matching families (SD3, Flux, ...): noise-level sampling and loss weighting; omitted = the defaults. "
            "The UNet families reject it."
        ),
    )
    ema: EmaSpec | None = Field(default=None, description="EMA of weights (full methods); omitted = off.")
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for weights init, noise and data order.")
    cache_latents: bool = Field(default=True, description="Encode images with the VAE once and reuse the latents.")
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop on validation loss (needs data.validationFraction > 0); omitted = off."
    )


class SamplingSpec(ApiModel):
    """Sample images generated during training to watch progress."""

    prompts: list[Annotated[str, StringConstraints(max_length=1000)]] = Field(
        default_factory=list,
        max_length=64,
        description="Prompts to sample (each at most 1,000 characters); empty = none.",
    )
    every: int = Field(default=500, ge=1, description="Sample every N steps (and at the end).")
    images_per_prompt: int = Field(default=1, ge=1, le=16, description="Images per prompt.")
    inference_steps: int = Field(default=25, ge=1, le=500, description="Denoising steps per image.")
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0, description="Classifier-free guidance scale.")


class ScratchSpec(ApiModel):
    """The per-pod staging volume for model, data and caches."""

    size: Quantity = Field(default="100Gi", description="Volume size.")
    storage_class_name: str | None = Field(
        default=None, description="StorageClass of a generic ephemeral volume; omitted = emptyDir."
    )


class ResourcesSpec(ApiModel):
    """Pods and what each pod gets."""

    nodes: int = Field(default=1, ge=1, le=1024, description="Trainer pods; more than one uses PyTorch distributed.")
    gpus_per_node: int = Field(default=1, ge=0, le=64, description="GPUs per pod; 0 = CPU training.")
    gpu_resource: str = Field(default="nvidia.com/gpu", min_length=1, description="Extended resource name of a GPU.")
    cpu: Quantity = Field(default="4", description="CPU request and limit per pod.")
    memory: Quantity = Field(default="32Gi", description="Memory request and limit per pod.")
    shared_memory: Quantity = Field(default="8Gi", description="Size of /dev/shm for data-loader workers.")
    scratch: ScratchSpec = section(ScratchSpec, "Staging volume.")


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; omitted = all."
    )
    toleration_seconds: int | None = Field(default=None, description="How long a NoExecute taint is tolerated.")


class SchedulingSpec(ApiModel):
    """Where and when the trainer pods run."""

    queue_name: str | None = Field(
        default=None, min_length=1, description="Kueue LocalQueue; the Job is created suspended until admitted."
    )
    priority_class_name: str | None = Field(default=None, min_length=1, description="PriorityClass of the pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the pods.")
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A core/v1 Affinity, passed to the pods as written.",
    )


class RunPolicySpec(ApiModel):
    """Lifecycle: suspension, retries, deadlines, clean-up."""

    suspend: bool = Field(
        default=False, description="Suspend (true) or resume (false); resuming continues from the newest checkpoint."
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=1000, description="Restarts, each resuming from the newest checkpoint, before Failed."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job after this many seconds running; omitted = no limit."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished FineTuneJob after this many seconds; omitted = keep."
    )
    termination_grace_period_seconds: int = Field(
        default=600,
        ge=30,
        le=86_400,
        description=(
            "Seconds a stopping trainer pod (preemption, suspend, drain) gets to agree on a step with its "
            "peers, write and upload a checkpoint and exit; the pod's terminationGracePeriodSeconds."
        ),
    )
    process_group_timeout_seconds: int = Field(
        default=3600,
        ge=5,
        le=86_400,
        description=(
            "How long a rank waits for its peers in a collective (NCCL/gloo) before failing; it must cover "
            "rank 0 staging the model and generating DreamBooth class images while the others wait."
        ),
    )


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what data, how, and where the results go."""

    model: ModelSpec = Field(description="Base model. Immutable after creation.")
    method: MethodSpec = Field(description="Fine-tuning method. Immutable after creation.")
    data: DataSpec = Field(description="Training data. Immutable after creation.")
    storage: StorageSpec = section(StorageSpec, "S3-compatible connection for s3:// URIs.")
    output: OutputSpec = Field(description="Where checkpoints, samples and outputs go.")
    training: TrainingSpec = Field(description="Optimisation settings.")
    validation: SamplingSpec = section(SamplingSpec, "Sample images during training.")
    resources: ResourcesSpec = section(ResourcesSpec, "Pods and their resources.")
    image: str = Field(default="", description="Trainer image; empty = the operator's default.")
    scheduling: SchedulingSpec = section(SchedulingSpec, "Placement and queueing.")
    run_policy: RunPolicySpec = section(RunPolicySpec, "Suspension, retries, deadline, TTL.")
