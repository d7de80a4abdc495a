"""Where the trained weights live across ranks, and how a checkpoint holds them (`training.parallelism`).

`WholeWeights` (ddp): every rank holds every trained weight; rank 0 saves them in one file and its
optimizer state beside them. `ShardedWeights` (fsdp): the denoiser of a full fine-tune is sharded with
PyTorch's FSDP2 (`fully_shard` on each of the family's repeated blocks, then on the whole), so each rank
holds a slice of its weights, gradients and optimizer state; a checkpoint is written with torch's
distributed checkpoint (DCP): each rank writes the shard file of its slices (model and optimizer), rank 0
also the index (`.metadata`), and every file goes under the checkpoint's one manifest. Loading reads the
index and any rank's files, so a run resumes on another number of ranks.

DCP names its files `__<rank>_<n>.distcp` and `.metadata`; a checkpoint names them `shard-<rank>-<n>.distcp`
and `shards.metadata` (manifest names never start with a dot).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from kubetune.api.spec import FsdpSpec, TrainingSpec
from kubetune_trainer.checkpoint_state import load_trained_weights, trained_shapes, trained_weights
from kubetune_trainer.exitcodes import ConfigError, TrainerError

SHARD_INDEX = "shards.metadata"
_DCP_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
_SHARD_FILE = re.compile(r"^shard-(\d+)-(\d+)\.distcp$")


def is_shard_file(name: str) -> bool:
    return name == SHARD_INDEX or bool(_SHARD_FILE.match(name))


class WholeWeights:
    """ddp: each rank trains a whole copy; rank 0 saves the trained weights (and the optimizer, as a part)."""

    collective_forward = False
    """Whether the denoiser's forward needs every rank (a sharded model gathers its weights from all)."""

    def __init__(self, trained: dict[str, Any]) -> None:
        self.trained = trained

    def state(self) -> dict[str, Any]:
        return trained_weights(self.trained)

    def local_state(self) -> dict[str, Any]:
        return self.state()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return trained_shapes(self.trained)

    def write_shards(self, folder: Path) -> dict[str, Path]:
        return {}

    read_shards = None

    def load(self, weights: dict[str, Any]) -> None:
        load_trained_weights(self.trained, weights)

    def gather_for_export(self, components: Any) -> None:
        return


class ShardedWeights:
    """fsdp: the denoiser sharded across ranks; each rank saves and loads only its own slices."""

    collective_forward = True

    def __init__(self, model: Any, optimizer: Any, model_class: type) -> None:
        self.model, self.optimizer, self.model_class = model, optimizer, model_class

    def state(self) -> dict[str, Any]:
        return {}  # the weights are in the shard files

    def local_state(self) -> dict[str, Any]:
        """This rank's slices of the trained weights, on the CPU."""
        return {key: _local(param.detach()).cpu().contiguous() for key, param in self.model.named_parameters()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def _state_dicts(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def write_shards(self, folder: Path) -> dict[str, Path]:
        """Save this rank's slices into `folder` (a collective); returns the files this rank uploads."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        dcp.save(self._state_dicts(), checkpoint_id=str(folder))
        rank = dist.get_rank()
        files = {}
        for path in sorted(folder.iterdir()):
            match = _DCP_FILE.match(path.name)
            if match and int(match.group(1)) == rank:
                files[f"shard-{match.group(1)}-{match.group(2)}.distcp"] = path
            elif path.name == ".metadata" and rank == 0:
                files[SHARD_INDEX] = path
        return files

    def read_shards(self, files: dict[str, Path]) -> dict[str, Any]:
        """The slices this rank holds now, read from a checkpoint's shard files (every rank's, any count)."""
        import torch.distributed.checkpoint as dcp

        if SHARD_INDEX not in files:
            raise ConfigError(f"this checkpoint has no {SHARD_INDEX}: it was written with training.parallelism "
                              "ddp, and this job runs fsdp; resume with the parallelism that wrote it")
        import torch.distributed as dist

        # this rank's view of the pod's shared download, under the names DCP reads
        folder = next(iter(files.values())).parent / f"dcp-rank-{dist.get_rank()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name, path in files.items():
            match = _SHARD_FILE.match(name)
            if name == SHARD_INDEX:
                (folder / ".metadata").symlink_to(path)
            elif match:
                (folder / f"__{match.group(1)}_{match.group(2)}.distcp").symlink_to(path)
        state = self._state_dicts()
        try:
            dcp.load(state, checkpoint_id=str(folder))
        except Exception as exc:  # every shard verified against its sha256 before this
            raise TrainerError(f"the checkpoint's shards verified but do not load into this model "
                               f"({type(exc).__name__}: {exc}".splitlines()[0][:300] + ")") from exc
        return state

    def load(self, weights: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.model, weights["model"])
        set_optimizer_state_dict(self.model, self.optimizer, weights["optimizer"])

    def gather_for_export(self, components: Any) -> None:
        """A collective: rank 0 gets an unsharded copy of the trained denoiser as `components.denoiser`."""
        import torch
        from accelerate import init_empty_weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if full:  # rank 0: the gathered tensors become the copy's weights, with no random init in between
            with init_empty_weights(include_buffers=False):
                whole = self.model_class.from_config(self.model.config)
            whole.load_state_dict({key: value.to(torch.float32) for key, value in full.items()}, assign=True)
            components.denoiser = whole


def _local(tensor: Any) -> Any:
    """This rank's part of a tensor: a sharded (DTensor) one's local shard, any other whole."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def held_bytes(params: list[Any], optimizer: Any) -> int:
    """Bytes of training state this rank holds: its trained weights, their gradients (shaped like the weights
    in both modes, whether or not they are allocated at this moment) and its optimizer state."""
    import torch

    weights = sum(_local(p).nbytes for p in params)
    state = sum(_local(v).nbytes for entry in optimizer.state.values() for v in entry.values() if torch.is_tensor(v))
    return 2 * weights + state


OFFLOAD_BACKEND = "cuda:nccl,cpu:gloo"
"""With CPU offload, shards and their gradients live on the CPU, whose collectives (the gradient norm's) NCCL
cannot run: the process group has a gloo side for them, as accelerate gives its own FSDP offload."""


def offloaded(training: TrainingSpec) -> bool:
    return training.parallelism == "fsdp" and training.fsdp is not None and training.fsdp.cpu_offload


def single_process_group(device: Any, offload: bool) -> None:
    """FSDP shards over a process group: a run of one process (resumed on fewer ranks, or local) gets its own."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo" if device.type != "cuda" else OFFLOAD_BACKEND if offload else "nccl"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard(model: Any, settings: FsdpSpec | None, compute_dtype: Any) -> type:
    """Apply FSDP2 to `model` in place: each repeated block (the class names diffusers lists in
    `_no_split_modules`) is one unit, the rest the root's; returns the model's class before sharding.
    Its forward runs in `compute_dtype` (FSDP's mixed precision) and its gradients reduce in float32."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    settings = settings or FsdpSpec()
    model_class = type(model)
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError(f"training.parallelism fsdp: {model_class.__name__} names no repeated blocks to shard "
                          "(_no_split_modules); train it with ddp")
    offload = CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy()
    # weights gathered in the compute dtype, gradients reduced in float32 into float32 shards (as torchtitan):
    # autocast over the whole model would gather float32 and keep a cast copy of each block until the backward
    precision = MixedPrecisionPolicy() if compute_dtype == torch.float32 else MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for module in [*reversed(blocks), model]:  # innermost first: a UNet's up-blocks hold listed blocks too
        fully_shard(module, reshard_after_forward=settings.reshard_after_forward, offload_policy=offload,
                    mp_policy=precision)
    if dist.get_backend() == "gloo":  # gloo's AVG reduce-scatter sums (pytorch#162338): sum, then FSDP divides
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model_class
