"""Resumable batches, grouped into aspect-ratio buckets of about the same pixel count.

With `data.aspectBuckets`, wide and tall images keep their shape: each is assigned to the
bucket (width, height) nearest its aspect ratio, and every batch comes from one bucket.
Without it there is one square bucket. The order of batches depends only on the seed, the
epoch and the position, so a resumed run sees exactly the batches it would have seen.
Ranks take turns through one shuffled epoch (disjoint shards); the last few batches of an
epoch that do not divide among the ranks wait for a later epoch, so every rank runs the
same number of batches per epoch. A batch's augmentation depends on its place in the epoch,
not on which rank renders it, so a run resumed on another number of ranks sees the same batches
(when the epoch's batches divide among both counts).

`PrefetchedBatches` hands the decoding, resizing, cropping and flipping to loader worker
processes (`data.loaderWorkers`), which render batches ahead (`data.prefetchBatches` each)
and pass the pixels through shared memory (/dev/shm). The batches themselves, and so the
order and the resume position, are still decided here in the training process: workers only
render what they are given.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator
from typing import Any

from kubetune.api.spec import DataSpec
from kubetune_trainer.data import Batch, Dataset, make_batch, rendered
from kubetune_trainer.exitcodes import ConfigError

MAX_ASPECT = 4.0


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `multiple`, at most resolution² pixels, aspect ≤ 4:1, both ways."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(multiple, resolution * 4 + 1, multiple):
        height = (area // width) // multiple * multiple
        if height >= multiple and max(width / height, height / width) <= MAX_ASPECT:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `size`'s (in log space, so 2:1 and 1:2 are symmetric)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), b))


def assign_buckets(dataset: Dataset, spec: DataSpec, multiple: int) -> dict[tuple[int, int], list[int]]:
    """Example indices per bucket; one square bucket when aspect buckets are off."""
    square = (spec.resolution, spec.resolution)
    if not spec.aspect_buckets:
        return {square: list(range(len(dataset.examples)))}
    sizes = bucket_sizes(spec.resolution, multiple)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, example in enumerate(dataset.examples):
        bucket = nearest_bucket(example.size, sizes) if all(example.size) else square
        groups.setdefault(bucket, []).append(index)
    return groups


class BatchStream:
    """Endless seeded batches for one rank; `state_dict()` is its position, for checkpoints."""

    def __init__(self, dataset: Dataset, spec: DataSpec, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, multiple: int = 64, latent_crop: int = 0) -> None:
        self.dataset, self.spec, self.batch_size, self.seed = dataset, spec, batch_size, seed
        self.rank, self.world_size, self.latent_crop = rank, world_size, latent_crop
        self.buckets = assign_buckets(dataset, spec, multiple)
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches()

    def per_epoch(self) -> int:
        """Images this rank sees per epoch (whole batches)."""
        return len(self._batches) * self.batch_size

    def _epoch_batches(self) -> list[tuple[tuple[int, int], list[int]]]:
        rng = random.Random(f"order-{self.seed}-{self.epoch}")
        batches = []
        for bucket in sorted(self.buckets):
            members = list(self.buckets[bucket])
            rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                chunk += [members[i % len(members)] for i in range(self.batch_size - len(chunk))]
                batches.append((bucket, chunk))
        rng.shuffle(batches)
        whole = len(batches) - len(batches) % self.world_size
        if whole == 0:  # fewer batches than ranks: sharing beats idling
            return [batches[self.rank % len(batches)]]
        return batches[self.rank : whole : self.world_size]

    def next_batch(self) -> Batch:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        bucket, indices = self._batches[self.position]
        shared = self.position * self.world_size + self.rank  # the batch's place in the epoch, on any rank count
        items = [(self.dataset.examples[index], random.Random(f"augment-{self.seed}-{self.epoch}-{shared}-{slot}"))
                 for slot, index in enumerate(indices)]
        self.position += 1
        return make_batch(items, self.spec, bucket, self.latent_crop)

    def close(self) -> None:
        """Nothing to stop: this stream renders in the training process."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "worldSize": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the run that saved `state` was, also on another number of ranks: the epoch's batches
        it consumed (its position times its rank count) are consumed here too, when they divide."""
        consumed = int(state["position"]) * int(state.get("worldSize", self.world_size))
        if consumed % self.world_size:
            raise ConfigError(f"the checkpoint was saved by {state.get('worldSize')} ranks after {consumed} batches "
                              f"of its epoch, which {self.world_size} ranks cannot share evenly; resume on a rank "
                              "count that divides it, or on the original one")
        self.epoch, self.position = int(state["epoch"]), consumed // self.world_size
        self._batches = self._epoch_batches()


class _Render:
    """What a loader worker does with a planned batch: render its pixels."""

    def __getitem__(self, planned: tuple[Batch, dict[str, int]]) -> tuple[Batch, dict[str, int]]:
        batch, position = planned
        return rendered(batch), position


def _planned(stream: BatchStream) -> Iterator[tuple[Batch, dict[str, int]]]:
    """Endless (batch, stream position after it); read in the training process, ahead of the workers."""
    while True:
        batch = stream.next_batch()
        yield batch, stream.state_dict()


def _as_is(item: Any) -> Any:
    return item


def _own_process_group(worker_id: int) -> None:
    """A stop signal sent to the trainer's process group (a terminal's Ctrl-C, torchrun stopping its
    workers) is the training process's to handle: it checkpoints, then its loader workers end with it;
    a worker that died of it would make the DataLoader fail the step. So each worker leaves the group.
    A signal sent to the worker itself still ends it, as multiprocessing's clean-up at exit relies on
    (a worker that ignored SIGTERM would hang its parent's exit): the trainer's own stop handlers,
    inherited through fork, give way to the defaults."""
    import os
    import signal

    os.setpgid(0, 0)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.SIG_DFL)


class PrefetchedBatches:
    """A `BatchStream` whose batches `workers` processes render ahead, `prefetch` batches each.

    Its position is that of the last batch handed out, not of the ones rendered ahead, so a
    checkpoint resumes exactly where training was; loading a position restarts the workers there.
    """

    def __init__(self, stream: BatchStream, workers: int, prefetch: int) -> None:
        self.stream, self.workers, self.prefetch = stream, workers, prefetch
        self.position = stream.state_dict()
        self._rendered: Iterator[tuple[Batch, dict[str, int]]] | None = None

    def per_epoch(self) -> int:
        return self.stream.per_epoch()

    @property
    def epoch(self) -> int:
        return self.position["epoch"]

    def next_batch(self) -> Batch:
        if self._rendered is None:
            self._rendered = self._start()
        batch, self.position = next(self._rendered)
        return batch

    def _start(self) -> Iterator[tuple[Batch, dict[str, int]]]:
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(_Render(), sampler=_planned(self.stream), batch_size=None, collate_fn=_as_is,
                            num_workers=self.workers, prefetch_factor=self.prefetch,
                            worker_init_fn=_own_process_group,
                            generator=torch.Generator())  # its seed draw leaves the global RNG alone
        with warnings.catch_warnings():  # workers only decode images: no thread of ours runs in them
            warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                                    category=DeprecationWarning)
            return iter(loader)

    def close(self) -> None:
        """Stop the workers: the loader's iterator stops them when it goes (and they stop when this process ends)."""
        self._rendered = None

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self.position = self.stream.state_dict()


def prefetched(stream: BatchStream, workers: int, prefetch: int) -> BatchStream | PrefetchedBatches:
    """`stream` rendered by `workers` loader processes; with none, the training process renders lazily."""
    return PrefetchedBatches(stream, workers, prefetch) if workers > 0 else stream
