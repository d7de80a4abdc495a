"""Optimizers by `training.optimizer` name and diffusers' learning-rate schedules.

bitsandbytes' 8-bit AdamW runs on CUDA and, since its CPU backend, on CPU; prodigyopt is plain
PyTorch. Both come with the trainer extra; the ConfigError is for images built without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetune.api.spec import TrainingSpec
from kubetune_trainer.exitcodes import ConfigError


def _adamw(params: list[Any], spec: TrainingSpec) -> Any:
    import torch

    devices = {p.device.type for p in params}
    fused = devices in ({"cuda"}, {"cpu"})  # torch's one-kernel AdamW, on CPU too (about 6x the Python loop)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=fused)


def _adamw8bit(params: list[Any], spec: TrainingSpec) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError("optimizer adamw8bit needs bitsandbytes, which this image lacks") from exc
    return bnb.optim.AdamW8bit(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def _prodigy(params: list[Any], spec: TrainingSpec) -> Any:
    try:
        from prodigyopt import Prodigy
    except ImportError as exc:
        raise ConfigError("optimizer prodigy needs prodigyopt, which this image lacks") from exc
    return Prodigy(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


OPTIMIZERS: dict[str, Callable[[list[Any], TrainingSpec], Any]] = {
    "adamw": _adamw, "adamw8bit": _adamw8bit, "prodigy": _prodigy,
}


def build_optimizer(params: list[Any], spec: TrainingSpec) -> Any:
    return OPTIMIZERS[spec.optimizer](params, spec)


def build_lr_scheduler(optimizer: Any, spec: TrainingSpec, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    schedule = spec.lr_scheduler
    return get_scheduler(schedule.type, optimizer=optimizer, num_warmup_steps=schedule.warmup_steps,
                         num_training_steps=total_steps, num_cycles=schedule.num_cycles, power=schedule.power)
