"""The training loop: a `Trainer` whose `train()` is a short sequence of named steps.

Everything it uses arrives built (see `assembly.build_trainer`): components, method,
objective, data stream, optimizer, checkpointer, sampler, reporter, each behind the small
interface `parts` names. The checkpointer saves the trained weights and the state of the parts
registered with it (`register_state`); step hooks see a `StepRecord` of each step. It resumes
from the newest complete checkpoint by itself, so a restarted pod simply runs `train()` again. A stop
signal to any rank stops every rank after the same step, with a checkpoint of it (see
`distributed`).

With a validation split and `output.export: best`, each new best validation step gets a
checkpoint (unless the cadence saved one there already), pinned out of `keepCheckpoints`'
rotation, and the export loads its weights (and EMA average) back before writing the outputs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.status import CheckpointRef, LoraOutputs, Outputs, SampleRef
from kubetune_trainer.checkpoint import Checkpointer
from kubetune_trainer.checkpoint_state import CheckpointDamaged, RngState
from kubetune_trainer.cpu_quota import fit_threads_to_cpu_limit
from kubetune_trainer.distributed import agreed_signal
from kubetune_trainer.exitcodes import ConfigError, Interrupted, StorageUnavailable
from kubetune_trainer.methods import TrainingMethod
from kubetune_trainer.model_card import write_model_card
from kubetune_trainer.models.family import Components
from kubetune_trainer.objective import DiffusionObjective
from kubetune_trainer.parts import BatchSource, ImageSampler, StepHook, StepRecord, Validator, WeightAverage
from kubetune_trainer.reporting import Reporter, Smoothed, aspect_buckets
from kubetune_trainer.sharding import ShardedWeights, WholeWeights
from kubetune_trainer.storage.interface import ObjectStore, as_prefix, join_uri
from kubetune_trainer.validation import (
    BEST_VALIDATION_LOSS,
    LAST_STEP,
    EarlyStopper,
    LossValidator,
    build_export_choice,
)


@dataclass
class StopRequest:
    """A stop asked of this process (`received`, set by its signal handler) and the one all ranks agreed on.

    Once `armed` (training started), every rank learns at the end of each step whether any rank
    received a signal (`Trainer.agree_on_stop`); if so `signal` is set on all of them and they all
    checkpoint that step and stop.
    """

    received: str | None = None
    signal: str | None = None
    armed: bool = False
    ended: bool = False
    """The run has ended: a late signal (a suspend reaches pods at different times) waits for the result."""


@dataclass
class TrainerParts:
    """The built pieces a Trainer coordinates."""

    job: FineTuneJob
    components: Components
    method: TrainingMethod
    trained: dict[str, Any]
    accelerator: Any
    denoiser: Any
    objective: DiffusionObjective
    data: BatchSource
    optimizer: Any
    lr_scheduler: Any
    checkpointer: Checkpointer
    sampler: ImageSampler
    validator: Validator
    stopper: EarlyStopper
    ema: WeightAverage
    output_store: ObjectStore
    reporter: Reporter
    total_steps: int
    scratch: Path
    weights: WholeWeights | ShardedWeights
    """Where the trained weights live across ranks (`training.parallelism`) and how checkpoints hold them."""
    stop: StopRequest = field(default_factory=lambda: StopRequest())
    hooks: list[StepHook] = field(default_factory=list)


class Trainer:
    """Runs one job from its newest checkpoint (or step 0) to `total_steps`, then exports."""

    def __init__(self, parts: TrainerParts) -> None:
        self.p = parts
        self.step = 0
        self.checkpoints: list[CheckpointRef] = []
        self.outputs: dict[str, Any] | None = None
        self.stopped_early = False
        self._trainable: list[Any] | None = None
        self.saved_step: int | None = None
        """The step of the last checkpoint this run saved, known on every rank (only rank 0 writes)."""
        self.early_stop_message: str | None = None
        """Why training ended before `total_steps`, for the final status; None when it did not."""
        self.best = build_export_choice(parts.job.spec, isinstance(parts.validator, LossValidator))
        """The step whose weights the export writes: the best validation step, or the last."""
        self.smoothed = Smoothed()
        self.batch = GlobalBatch(parts)
        self.register_state()

    def register_state(self) -> None:
        """The parts whose state every checkpoint saves beside the weights, under the names the checkpoint
        format has always used; the RNG last, so that it is restored after anything that draws from it."""
        p, register = self.p, self.p.checkpointer.register
        if isinstance(p.weights, WholeWeights):  # a sharded optimizer is saved in the shard files
            register("optimizer", p.optimizer)
        register("batch", self.batch, required=False)
        register("lr_scheduler", p.lr_scheduler)
        register("data", p.data)
        register("early_stopping", p.stopper, required=False)
        register("ema", p.ema, required=False)
        register("best_weights", self.best, required=False)
        register("rng", RngState())

    @property
    def is_main(self) -> bool:
        return bool(self.p.accelerator.is_main_process)

    def train(self) -> dict[str, Any]:
        threads = fit_threads_to_cpu_limit()
        if threads is not None:
            self.p.reporter.notice(f"torch uses {threads} CPU threads, this process's share of the CPU limit")
        self.resume()
        self.p.reporter.phase("Training")
        self.p.reporter.started(self.step, self.p.total_steps)
        self.p.reporter.buckets(aspect_buckets(self.p.data))
        self.p.stop.armed = True
        try:
            while self.step < self.p.total_steps and not self.stopped_early:
                self.run_step()
        finally:
            self.p.data.close()  # loader workers end now, not whenever the garbage collector reaches them
        return self.export()

    def run_step(self) -> None:
        """One optimizer step and what follows it: report, agree on a stop, validate, checkpoint, sample."""
        loss, seconds = self.train_step()
        self.step += 1
        self.p.reporter.step(self.step, loss, self.images_per_step(), seconds, self.p.data.epoch + 1)
        self.p.reporter.loss_terms(self.step, self.p.objective.terms.take())
        self.agree_on_stop()
        last = self.step == self.p.total_steps
        stopping = self.p.stop.signal is not None  # the grace period is for the checkpoint, not for samples
        validation = self.validate() if self.p.validator.due(self.step, last) and not stopping else None
        if self.checkpoint_due(last):
            self.save_checkpoint()
        if self.p.sampler.due(self.step, last or self.stopped_early) and not stopping:
            self.sample()
        record = self.record(loss, validation)
        for hook in self.p.hooks:
            hook(record)
        self.stop_if_asked()

    def record(self, loss: float, validation: float | None) -> StepRecord:
        """What step hooks learn of the step just finished."""
        return StepRecord(step=self.step, total_steps=self.p.total_steps, step_loss=loss,
                          smoothed_loss=self.smoothed.add(loss),
                          learning_rate=float(self.p.lr_scheduler.get_last_lr()[0]), validation_loss=validation,
                          checkpoint_due=self.p.checkpointer.due(self.step),
                          checkpoint_saved=self.saved_step == self.step, stop_signal=self.p.stop.signal,
                          early_stop=self.early_stop_message)

    def agree_on_stop(self) -> None:
        """A collective at the end of every step: all ranks learn whether any rank was asked to stop."""
        if self.p.stop.signal is None:
            self.p.stop.signal = agreed_signal(self.p.stop.received, self.p.accelerator)

    def stop_if_asked(self) -> None:
        """After an agreed stop (preemption, suspend, drain) every rank checkpoints this step and stops (143).

        Rank 0 writes the checkpoint; the others wait for it, so none exits before it is complete.
        """
        stop = self.p.stop
        if stop.signal is None:
            return
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.p.accelerator.wait_for_everyone()
        where = "" if stop.received == stop.signal else " sent to another rank"
        raise Interrupted(f"stopped by {stop.signal}{where} after step {self.step}; every rank stopped there and "
                          "a restart resumes from the checkpoint just saved")

    def checkpoint_due(self, last: bool) -> bool:
        """The cadence's checkpoints, and one at each new best validation step, which the export may load back.
        The last step needs none: its weights are still in memory when the export runs."""
        if last or self.saved_step == self.step:
            return False
        return self.best.step == self.step or (self.p.checkpointer.due(self.step) and not self.stopped_early)

    def validate(self) -> float:
        loss = self.agreed_loss(self.p.validator.evaluate(self.p.denoiser))
        self.p.reporter.validation(self.step, loss)
        if self.best.update(self.step, loss):
            self.p.checkpointer.pin(self.step)  # the previous best goes back into rotation
        if self.p.stopper.update(loss):
            self.stopped_early = True
            self.early_stop_message = (f"stopped early at step {self.step} of {self.p.total_steps}: "
                                       f"{self.p.stopper.explain()}")
            self.p.reporter.notice(self.early_stop_message)
        return loss

    def agreed_loss(self, loss: float) -> float:
        """Rank 0's validation loss on every rank: the ranks then take the same early-stop and best-step
        decisions (each evaluates the same images, but a device may round differently), so they reach the
        same checkpoint barriers."""
        if self.p.accelerator.num_processes == 1:
            return loss
        import torch
        import torch.distributed as dist

        value = torch.tensor([loss], dtype=torch.float64, device=self.p.accelerator.device)
        dist.broadcast(value, src=0)
        return float(value.item())

    def images_per_step(self) -> int:
        return self.p.job.spec.training.batch_size * self.batch.accumulation * self.p.accelerator.num_processes

    def generator(self, micro: int) -> Any:
        """The noise of micro-batch `micro` of this step on this rank, seeded by the micro-batch's place in the
        step's global batch, so a run resumed on another number of ranks draws the same noise per image."""
        import torch

        accelerator = self.p.accelerator
        shared = (self.step * self.batch.accumulation + micro) * accelerator.num_processes + accelerator.process_index
        return torch.Generator().manual_seed(self.p.job.spec.training.seed * 1_000_003 + shared * 1009)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; the loss is read back once, after the whole step is queued on the device."""
        import torch

        started, losses = time.perf_counter(), []
        accelerator, training = self.p.accelerator, self.p.job.spec.training
        for micro in range(self.batch.accumulation):
            batch = self.p.data.next_batch()
            with accelerator.accumulate(self.p.denoiser):
                loss = self.p.objective.loss(batch, self.generator(micro))
                accelerator.backward(loss)
                losses.append(loss.detach())
        self.average_unwrapped_gradients()
        if training.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.trainable_parameters(), training.max_grad_norm)
        self.p.optimizer.step()
        self.p.lr_scheduler.step()
        self.p.optimizer.zero_grad(set_to_none=True)
        self.p.ema.step(self.trainable_parameters())
        return float(torch.stack(losses).mean()), time.perf_counter() - started

    def average_unwrapped_gradients(self) -> None:
        """Trained modules other than the (DDP-wrapped) denoiser, e.g. text-encoder adapters, average by hand."""
        if self.p.accelerator.num_processes == 1:
            return
        for name, module in self.p.trained.items():
            if name == self.p.components.family.denoiser_name:
                continue
            for param in module.parameters():
                if param.requires_grad and param.grad is not None:
                    param.grad = self.p.accelerator.reduce(param.grad, reduction="mean")

    def trainable_parameters(self) -> list[Any]:
        """Fixed once the method has prepared the model, so listed once rather than every step."""
        if self._trainable is None:
            self._trainable = [p for module in self.p.trained.values() for p in module.parameters()
                               if p.requires_grad]
        return self._trainable

    def trainable_state(self) -> dict[str, Any]:
        return self.p.weights.state()

    def save_checkpoint(self) -> None:
        """Rank 0 writes the weights and the registered parts' state (with fsdp, each rank writes its shards
        first); every rank knows the step was saved."""
        self.p.accelerator.wait_for_everyone()
        self.saved_step = self.step
        shards = self.upload_shards()
        if not self.is_main:
            return
        _, seconds = self.p.checkpointer.save_training(self.step, self.trainable_state(), shards)
        self.checkpoints = self.p.checkpointer.complete()
        self.p.reporter.checkpoints(self.checkpoints, seconds)

    def upload_shards(self) -> dict[str, Any] | None:
        """With sharded weights (a collective): rank 0 makes way for the checkpoint, then every rank writes and
        uploads its own shard files; rank 0 learns every rank's manifest entries. None with whole weights."""
        if not self.p.weights.collective_forward:
            return None
        import torch.distributed as dist

        checkpointer, accelerator = self.p.checkpointer, self.p.accelerator
        if self.is_main:
            checkpointer.begin(self.step)
        folder = self.p.checkpointer.scratch / "shards-out"  # this rank's own
        try:
            files = self.p.weights.write_shards(folder)
            accelerator.wait_for_everyone()
            entries = checkpointer.upload_files(self.step, files)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, entries)
        return {name: entry for rank_entries in everyone for name, entry in rank_entries.items()}

    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies and loads; each newer one is skipped with why.

        Every rank verifies for itself, then the ranks check they restored the same step. With none
        usable, training starts at step 0 (and saves over the damaged folders as it reaches their steps).
        """
        checkpointer = self.p.checkpointer
        if self.is_main:
            checkpointer.check_writable()
            checkpointer.clean_incomplete()
        self.p.accelerator.wait_for_everyone()
        candidates = checkpointer.complete()
        if candidates:
            self.p.reporter.phase("Resuming")
        restored = None
        for ref in reversed(candidates):
            try:
                self.restore(ref)
            except CheckpointDamaged as exc:
                checkpointer.damaged[ref.step] = str(exc)
                continue
            restored = ref.step
            break
        self.agree_on_resume(restored)
        self.report_damaged(restored)
        self.checkpoints = checkpointer.complete()
        self.p.reporter.checkpoints(self.checkpoints, None)

    def report_damaged(self, restored: int | None) -> None:
        damaged = self.p.checkpointer.damaged
        for step, why in sorted(damaged.items(), reverse=True):
            self.p.reporter.notice(f"checkpoint step-{step} skipped: {why}; it is left in place, ignored, "
                                   "and replaced if this run saves that step again")
        if damaged:
            where = f"step {restored}, the newest that verified" if restored is not None else "step 0: none verified"
            self.p.reporter.notice(f"resuming from {where}")

    def agree_on_resume(self, restored: int | None) -> None:
        """A collective: every rank must have restored the same checkpoint, or their weights would differ."""
        if self.p.accelerator.num_processes == 1:
            return
        import torch
        import torch.distributed as dist

        step = -1 if restored is None else restored
        bounds = torch.tensor([step, -step], dtype=torch.int64, device=self.p.accelerator.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        highest, lowest = int(bounds[0].item()), -int(bounds[1].item())
        if highest != lowest:
            raise StorageUnavailable(f"the ranks found different checkpoints usable (steps {lowest} to {highest}; "
                                     "-1 is none): the output changed while they read it; a restart checks again")

    def read_checkpoint(self, ref: CheckpointRef, every_rank: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """A checkpoint's weights and state, verified and loaded but not applied (see `Checkpointer.read_training`).

        When `every_rank` reads it (a collective), the ranks of a pod share one download in the pod's scratch:
        its first rank fetches and verifies it, the others then read the same files, and it is removed once all
        have read it. A pod of 8 ranks resuming a sharded 12B fine-tune holds one copy, not 8.
        """
        checkpointer, weights = self.p.checkpointer, self.p.weights
        if not every_rank:
            return checkpointer.read_training(ref, weights.shapes(), weights.read_shards)
        accelerator = self.p.accelerator
        folder = self.p.scratch / "tmp" / "resume" / f"step-{ref.step}"
        fetched: Any = None
        with accelerator.local_main_process_first():
            try:
                fetched = checkpointer.fetch_shared(ref, folder, first=accelerator.is_local_main_process)
            except Exception as exc:  # raised after the pod's other ranks have passed the barrier too
                fetched = exc
        try:
            self.agree_on_fetch(ref, fetched)
            files, verified = fetched
            return checkpointer.open_training(ref, files, verified, weights.shapes(), weights.read_shards)
        finally:
            accelerator.wait_for_everyone()
            if accelerator.is_local_main_process:
                shutil.rmtree(folder, ignore_errors=True)

    def agree_on_fetch(self, ref: CheckpointRef, fetched: Any) -> None:
        """A collective: unless every pod fetched `ref` whole, no rank loads it (the loads that follow are
        collectives too). Raises this rank's own failure, or `CheckpointDamaged` when only another pod failed."""
        ok = not isinstance(fetched, Exception)
        if self.p.accelerator.num_processes > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.p.accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if ok and not int(flag.item()):
                raise CheckpointDamaged("another pod could not fetch or verify it")
        if not ok:
            raise fetched

    def restore(self, ref: CheckpointRef) -> None:
        weights, state = self.read_checkpoint(ref)
        self.p.weights.load(weights)
        self.step = self.p.checkpointer.restore(state)
        if self.best.step is not None:
            self.p.checkpointer.pin(self.best.step)

    def sample(self) -> None:
        """Rank 0 samples; with sharded weights every rank runs the denoiser with it, and rank 0 keeps the images."""
        if self.is_main or self.p.weights.collective_forward:
            denoiser = self.p.accelerator.unwrap_model(self.p.denoiser)
            for ref in self.p.sampler.sample(self.step, denoiser, publish=self.is_main):
                self.p.reporter.sample(SampleRef.model_validate(ref))

    def export(self) -> dict[str, Any]:
        self.p.accelerator.wait_for_everyone()
        if not (self.is_main or self.p.weights.collective_forward):
            return {}
        step, reason = self.exported_step()  # with sharded weights every rank loads its slices of the best step
        self.p.weights.gather_for_export(self.p.components)
        if not self.is_main:
            return {}
        self.p.reporter.phase("Exporting")
        self.p.checkpointer.confirm_owner()  # final outputs are overwritten only on the owner's prefix
        folder = self.p.scratch / "final"
        shutil.rmtree(folder, ignore_errors=True)
        with self.p.ema.applied(self.trainable_parameters()):
            written = self.p.method.export(self.p.components, folder, self.p.job, step)
        final = as_prefix(join_uri(self.p.job.spec.output.uri, "final"))
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.p.output_store.upload(path, join_uri(final, path.relative_to(folder).as_posix()))
        uris = {kind: join_uri(final, path.relative_to(folder).as_posix()) for kind, path in written.items()}
        lora = {k: v for k, v in uris.items() if k in ("diffusers", "kohya")}
        pipeline = as_prefix(uris["pipeline"]) if "pipeline" in uris else None
        outputs = Outputs(uri=final, lora=LoraOutputs.model_validate(lora) if lora else None, pipeline=pipeline,
                          step=step, reason=reason)
        self.outputs = outputs.model_dump(by_alias=True, exclude_none=True)  # what the model card reads
        try:  # final/README.md and final/images/, before status names the outputs; the weights are already up
            write_model_card(self, folder, written)
        except Exception as exc:  # a card is documentation: its failure must not fail a trained job
            self.p.reporter.notice(f"the model card could not be written ({type(exc).__name__}: {exc}); "
                                   "the weights are complete")
        self.p.reporter.outputs(outputs)
        return self.outputs

    def exported_step(self) -> tuple[int, str]:
        """The step whose weights the outputs hold, and why. An earlier best step's weights (and EMA average)
        are loaded back from its checkpoint; when that checkpoint is gone or damaged, the last step's are kept."""
        best = self.best
        if best.step is not None and best.step != self.step and not self.load_best(best.step):
            return self.step, LAST_STEP
        self.p.reporter.notice(best.explain(self.step))
        return (self.step, LAST_STEP) if best.step is None else (best.step, BEST_VALIDATION_LOSS)

    def load_best(self, step: int) -> bool:
        """Load checkpoint `step` into the trained modules and the EMA; False, with a notice, when it is unusable."""
        ref = next((ref for ref in self.p.checkpointer.complete() if ref.step == step), None)
        try:
            if ref is None:
                raise CheckpointDamaged("it is no longer among the complete checkpoints")
            weights, state = self.read_checkpoint(ref, every_rank=self.p.weights.collective_forward)
        except CheckpointDamaged as exc:
            self.p.reporter.notice(f"checkpoint step-{step}, the best validation step's, cannot be exported ({exc}); "
                                   f"exporting the last step, {self.step}, instead")
            return False
        self.p.weights.load(weights)
        self.p.checkpointer.restore(state, only=("ema",))
        return True


class GlobalBatch:
    """The images one optimizer step trains on, kept when a run resumes on another number of ranks: its
    gradient accumulation becomes the saved run's times the ratio of rank counts (a checkpoint part)."""

    def __init__(self, parts: TrainerParts) -> None:
        self.world = int(parts.accelerator.num_processes)
        self.accumulation = parts.job.spec.training.gradient_accumulation_steps
        self.accelerator = parts.accelerator
        self.by_epochs = parts.job.spec.training.epochs is not None

    def state_dict(self) -> dict[str, int]:
        return {"worldSize": self.world, "accumulation": self.accumulation}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state:
            return  # a checkpoint from before this part: same ranks, same accumulation
        micro_batches = int(state["worldSize"]) * int(state["accumulation"])
        if self.by_epochs and int(state["worldSize"]) != self.world:
            raise ConfigError(f"training.epochs: this run was saved on {state['worldSize']} ranks and resumes on "
                              f"{self.world}, where its total of steps was counted for another rank count; resume "
                              "on the original rank count, or train by training.maxSteps")
        if micro_batches % self.world:
            raise ConfigError(f"the checkpoint's global batch is {micro_batches} micro-batches (from "
                              f"{state['worldSize']} ranks), which {self.world} ranks cannot share evenly; resume on "
                              "a rank count that divides it")
        self.accumulation = micro_batches // self.world
        self.accelerator.gradient_accumulation_steps = self.accumulation
