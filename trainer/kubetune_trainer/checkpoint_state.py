"""What a checkpoint holds: the trained weights, and the state of every part that training continues from.

A checkpoint is two files beside its manifest (see `checkpoint`): `trainable.safetensors`, the
trained parameters by `<module>.<parameter>`, and `training_state.pt`, a dict of the step and of
each registered part's `state_dict()` under the part's name: optimizer, lr_scheduler, data, rng,
early_stopping, ema, best_weights. A required part is in every checkpoint (a state without it does
not fit this trainer); an optional one restores from `{}` when a checkpoint predates it.

Loading tells damage from misfit. Bytes that matched their sha256 are what was saved: a loader
error on them (memory, scratch I/O, another torch) is a `TrainerError` (exit 1, retried) and
tensors that do not fit this model are a `ConfigError`, never damage that would silently resume
from an older step. Only files without a digest (old manifests) count as damaged
(`CheckpointDamaged`) when they do not load or fit.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from kubetune.api.status import CheckpointRef
from kubetune_trainer.exitcodes import ConfigError, TrainerError
from kubetune_trainer.parts import Stateful

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
STEP = "step"


class CheckpointDamaged(Exception):
    """A checkpoint that cannot be trusted, with why in a few words: skipped, never fatal by itself."""


class RngState:
    """The random generators a step draws from (torch, CUDA, Python, NumPy), so a resumed run draws the same."""

    def state_dict(self) -> dict[str, Any]:
        import numpy as np
        import torch

        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": (np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:])}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np
        import torch

        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state((state["numpy"][0], state["numpy"][1].numpy().astype("uint32"), *state["numpy"][2:]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """The named stateful parts a checkpoint saves, and their restore."""

    def __init__(self) -> None:
        self.parts: dict[str, tuple[Stateful, bool]] = {}

    def register(self, name: str, part: Stateful, required: bool = True) -> None:
        self.parts[name] = (part, required)

    def required(self) -> set[str]:
        return {STEP, *(name for name, (_, required) in self.parts.items() if required)}

    def state_dict(self, step: int) -> dict[str, Any]:
        return {STEP: step, **{name: part.state_dict() for name, (part, _) in self.parts.items()}}

    def load_state_dict(self, state: dict[str, Any], only: tuple[str, ...] | None = None) -> int:
        """Restore every part (or those named in `only`) from `state`; returns the step it was saved at."""
        for name, (part, _) in self.parts.items():
            if only is None or name in only:
                part.load_state_dict(state.get(name, {}))
        return int(state[STEP])


def trained_weights(trained: dict[str, Any]) -> dict[str, Any]:
    """The trained parameters of `trained`'s modules by `<module>.<parameter>`, on the CPU: what a checkpoint saves."""
    return {f"{name}.{key}": param.detach().cpu().contiguous()
            for name, module in trained.items()
            for key, param in module.named_parameters() if param.requires_grad}


def trained_shapes(trained: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes a checkpoint's weights must have to fit `trained`'s modules."""
    return {f"{name}.{key}": tuple(param.shape) for name, module in trained.items()
            for key, param in module.named_parameters() if param.requires_grad}


def load_trained_weights(trained: dict[str, Any], weights: dict[str, Any]) -> None:
    """Copy a checkpoint's weights into the modules that train them."""
    import torch

    with torch.no_grad():
        for name, module in trained.items():
            for key, param in module.named_parameters():
                if param.requires_grad:
                    param.copy_(weights[f"{name}.{key}"])


def write_files(folder: Path, weights: dict[str, Any], state: dict[str, Any]) -> dict[str, Path]:
    """The checkpoint's files in `folder`, by their names in the checkpoint."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / TRAINABLE_FILE))
    torch.save(state, folder / STATE_FILE)
    return {TRAINABLE_FILE: folder / TRAINABLE_FILE, STATE_FILE: folder / STATE_FILE}


def load_files(ref: CheckpointRef, files: dict[str, Path], verified: frozenset[str], shapes: dict[str, tuple[int, ...]],
               required: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The downloaded files loaded and checked against this trainer: the weights must be `shapes`, the
    state must hold the `required` parts (see the module's docstring for what fails how)."""
    import torch
    from safetensors.torch import load_file

    loaders = {TRAINABLE_FILE: lambda path: load_file(str(path)),
               STATE_FILE: lambda path: torch.load(path, weights_only=True, map_location="cpu", mmap=True)}
    loaded = {}
    for name, loader in loaders.items():
        if name not in files:
            raise CheckpointDamaged(f"its manifest does not list {name}")
        try:
            loaded[name] = loader(files[name])
        except Exception as exc:  # whatever the bytes make the loader raise
            if name in verified:
                raise TrainerError(f"checkpoint {ref.uri}: {name} matches the sha256 it was saved with but does "
                                   f"not load here ({type(exc).__name__}: {exc}".splitlines()[0] + "); it is kept "
                                   "and a restart tries it again. If this persists, run the image that wrote "
                                   "it") from exc
            raise CheckpointDamaged(f"{name} does not load: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    weights, state = loaded[TRAINABLE_FILE], loaded[STATE_FILE]
    if {k: tuple(v.shape) for k, v in weights.items()} != shapes:
        _misfit(ref, TRAINABLE_FILE, "holds other tensors than this job trains", verified)
    missing = required - set(state if isinstance(state, dict) else ())
    if missing:
        _misfit(ref, STATE_FILE, f"lacks {', '.join(sorted(missing))}", verified)
    return weights, state


def _misfit(ref: CheckpointRef, name: str, why: str, verified: frozenset[str]) -> None:
    """A file that does not fit this model: damage if unverified; else this trainer cannot continue the run."""
    if name not in verified:
        raise CheckpointDamaged(f"{name} {why}")
    raise ConfigError(f"checkpoint {ref.uri}: {name} {why}, though its bytes match the sha256 it was saved with: "
                      "it was written by a trainer that shapes this job's weights differently. Run the image "
                      f"that wrote it, or delete {ref.uri.rsplit('/checkpoints/', 1)[0]}/checkpoints/ to start "
                      "this job over")
