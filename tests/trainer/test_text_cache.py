"""Caption encodings are cached on scratch and under the output while the text encoders are frozen:
each text encoder (both, for SDXL) runs once per distinct caption across epochs, restarts in a
new pod and re-runs, the cached tensors equal fresh ones, and nothing is cached once a text
encoder trains: it is encoded every time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from trainer_probe import running_trainers
from trainer_support import local_job

from kubetune.api.spec import LoraSpec
from kubetune_trainer.caches.mirror import CacheMirror
from kubetune_trainer.caches.text import DiskTextCache, text_cache_folder
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from kubetune_trainer.methods import LoraMethod
from kubetune_trainer.models.family import Components
from kubetune_trainer.models.registry import load_components
from kubetune_trainer.parts import StepRecord
from kubetune_trainer.storage.local import LocalStore
from kubetune_trainer.trainer import Trainer

CAPTIONS = ["a red square", "a blue square", "a red square"]


def _counting(components: Components) -> list[list[int]]:
    """Rows each text encoder's forwards have seen, one list per encoder."""
    seen: list[list[int]] = [[] for _ in components.text_encoders]
    for rows, encoder in zip(seen, components.text_encoders, strict=True):
        encoder.register_forward_hook(lambda module, args, output, rows=rows: rows.append(int(args[0].shape[0])))
    return seen


def _encode(components: Components, captions: list[str]) -> list:
    """Every tensor the UNet is conditioned on for `captions`."""
    import torch

    with torch.no_grad():
        cond = components.family.encode(components, captions, [(64, 64, 0, 0, 64, 64)] * len(captions), "cpu")
    return [cond.encoder_hidden_states, *(cond.added_cond_kwargs or {}).values()]


def _cached(model: Path, scratch: Path) -> tuple[Components, DiskTextCache, list[list[int]]]:
    components = load_components(model, None)
    cache = DiskTextCache(text_cache_folder(scratch / "text", components))
    components.text_cache = cache
    return components, cache, _counting(components)


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_each_encoder_runs_once_per_caption_and_a_new_pod_runs_none(model: str, tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    import torch

    path = request.getfixturevalue(model)
    components, cache, seen = _cached(path, tmp_path / "pod-1")
    first = _encode(components, CAPTIONS)
    second = _encode(components, list(reversed(CAPTIONS)))  # the next epoch
    assert seen == [[2]] * len(components.text_encoders)  # two distinct captions, one forward per encoder
    assert (cache.hits, cache.misses) == (4, 2)
    uncached = load_components(path, None)  # no text cache: every call encodes
    want = _encode(uncached, CAPTIONS)
    assert len(want) == (3 if model == "tiny_sdxl" else 1)  # hidden states; SDXL adds pooled and time ids
    for got, again, expected in zip(first, second, want, strict=True):
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(again, expected.flip(0))

    remote = tmp_path / "out" / "cache" / "text" / cache.folder.name
    assert CacheMirror(LocalStore(), str(remote), cache, tmp_path / "tmp", rank=0).publish() == 2
    restarted, fresh, seen = _cached(path, tmp_path / "pod-2")  # a new pod: empty scratch, same model
    assert fresh.folder.name == cache.folder.name
    report = CacheMirror(LocalStore(), str(remote), fresh, tmp_path / "tmp", rank=0).fetch()
    assert (report.entries, report.ignored, report.label) == (2, [], "text cache")
    for got, expected in zip(_encode(restarted, CAPTIONS), want, strict=True):
        torch.testing.assert_close(got, expected)
    assert seen == [[]] * len(restarted.text_encoders) and fresh.misses == 0


def test_a_training_text_encoder_is_encoded_every_time(tiny_sd: Path, tmp_path: Path) -> None:
    components, cache, seen = _cached(tiny_sd, tmp_path)
    LoraMethod(LoraSpec(rank=2, alpha=2, train_text_encoder=True)).prepare(components)
    _encode(components, CAPTIONS)
    _encode(components, CAPTIONS)
    assert seen == [[3, 3]]
    assert (cache.hits, cache.misses, cache.names()) == (0, 0, set())


def test_the_key_follows_the_text_encoders_and_tokenizers_not_the_folder(tiny_sd: Path, tmp_path: Path) -> None:
    import torch

    from kubetune_demo.tiny import build_tiny_pipeline

    shutil.copytree(tiny_sd, tmp_path / "elsewhere")
    here, there = load_components(tiny_sd, None), load_components(tmp_path / "elsewhere", None)
    assert text_cache_folder(tmp_path, here) == text_cache_folder(tmp_path, there)
    other = load_components(build_tiny_pipeline(tmp_path / "other", family="sd", seed=1), None)
    assert text_cache_folder(tmp_path, other) != text_cache_folder(tmp_path, here)
    there.tokenizers[0].model_max_length = 32
    assert text_cache_folder(tmp_path, there) != text_cache_folder(tmp_path, here)
    there = load_components(tmp_path / "elsewhere", None)
    there.text_encoders[0].to(dtype=torch.bfloat16)  # runs in another precision
    assert text_cache_folder(tmp_path, there) != text_cache_folder(tmp_path, here)


class Crash(Exception):
    """Raised by a step hook to end a run the way a crash would."""


def _train(model: Path, data: Path, pvc: Path, scratch: Path, crash_after: int | None = None,
           output: str = "pvc://claim/out", **sections: dict) -> tuple[Trainer, list[int]]:
    """9 steps (3 epochs of 3 batches of 2) to a `pvc://` output; return the trainer and the steps run."""
    trainers, steps = [], []

    def observe(record: StepRecord) -> None:
        trainers.append(built[-1])
        steps.append(record.step)
        if record.step == crash_after:
            raise Crash(f"crashed after step {record.step}")

    job = local_job(str(model), str(data), output, data={"randomFlip": False},
                    training={"maxSteps": 9, **sections.pop("training", {})},
                    output={"checkpointEvery": 3, "keepCheckpoints": 2}, **sections)
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=scratch, log_every=0, pvc_root=pvc), hooks=[observe])
    assert result.exit_code == (0 if crash_after is None else 1), result.message
    return trainers[-1], steps


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_captions_are_encoded_once_across_epochs_restarts_and_reruns(model: str, squares: Path, tmp_path: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    path, pvc = request.getfixturevalue(model), tmp_path / "pvc"
    trainer, steps = _train(path, squares, pvc, tmp_path / "pod-1", crash_after=7)
    cache = trainer.p.components.text_cache
    assert isinstance(cache, DiskTextCache)
    assert (cache.misses, steps) == (6, [1, 2, 3, 4, 5, 6, 7])  # six distinct captions, over two epochs and more
    (remote,) = (pvc / "claim" / "out" / "cache" / "text").iterdir()
    assert remote.name == cache.folder.name and len(list(remote.glob("*.json"))) == 1  # all six by step 3

    trainer, steps = _train(path, squares, pvc, tmp_path / "pod-2")  # a new pod: empty scratch
    assert (trainer.p.components.text_cache.misses, steps) == (0, [7, 8, 9])
    assert len(list((tmp_path / "pod-2" / "text").rglob("*.pt"))) == 6
    entry = trainer.p.components.text_cache.load(next(iter(trainer.p.components.text_cache.names())))
    assert len(entry) == (2 if model == "tiny_sdxl" else 1)  # SDXL: both encoders' hidden states, and pooled

    trainer, _ = _train(path, squares, pvc, tmp_path / "pod-2", output="pvc://claim/again")  # a re-run
    assert trainer.p.components.text_cache.misses == 0


def test_nothing_is_cached_while_a_text_encoder_trains(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    trainer, _ = _train(tiny_sd, squares, tmp_path / "pvc", tmp_path / "scratch",
                        method={"type": "lora", "lora": {"rank": 4, "alpha": 8, "trainTextEncoder": True}})
    assert trainer.p.components.text_cache is None
    assert not (tmp_path / "scratch" / "text").exists()
    assert not (tmp_path / "pvc" / "claim" / "out" / "cache" / "text").exists()
    assert (tmp_path / "pvc" / "claim" / "out" / "cache" / "latents").is_dir()  # latents still are
