"""The model card beside the exported weights: `huggingface_hub.ModelCard` parses it, its metadata names
the base model and (DreamBooth) the trigger words, and every widget image it names lies beside it.

Tiny runs train for real through `run_job` at the default precision (bf16 on CPU); one runs against
the loopback S3 server, so the samples are copied through the storage interface and the card is
checked for storage details it must not carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from kubetune_trainer.model_card import (
    MAX_WIDGETS,
    base_model_id,
    base_model_revision,
    card_tags,
    pick_samples,
    publish_card,
)
from kubetune_trainer.models.registry import FAMILIES
from kubetune_trainer.storage.interface import ObjectInfo
from kubetune_trainer.storage.local import LocalStore

PROMPTS = ["a red square", "a blue square"]
DREAMBOOTH = {"type": "dreambooth-lora", "dreambooth": {"instancePrompt": "a photo of sks square",
                                                         "classPrompt": "a photo of a square",
                                                         "priorPreservation": False}}


def _infos(*names: str) -> list[ObjectInfo]:
    return [ObjectInfo(f"s3://b/out/samples/{name}", name, 10) for name in names]


@pytest.mark.parametrize(("uri", "repo", "revision"), [
    ("hf://stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0", None),
    ("hf://org/name@v1.0/", "org/name", "v1.0"),
    ("hf://org/name/", "org/name", None),
    ("s3://models/sd15/", "sd15", None),
    ("pvc://models/sdxl", "sdxl", None),
    ("s3://models", "base-model", None),
    ("/tmp/base", "/tmp/base", None),
])
def test_base_model_is_the_hub_repo_id_the_folder_name_or_the_path(uri: str, repo: str, revision: str | None) -> None:
    assert (base_model_id(uri), base_model_revision(uri)) == (repo, revision)


@pytest.mark.parametrize(("method", "family", "wanted", "absent"), [
    ("lora", "sd", {"lora", "stable-diffusion"}, {"dreambooth", "full-fine-tune", "stable-diffusion-xl"}),
    ("dreambooth-lora", "sdxl", {"lora", "dreambooth", "stable-diffusion-xl"}, {"full-fine-tune", "stable-diffusion"}),
    ("full", "sd", {"full-fine-tune", "stable-diffusion"}, {"lora", "dreambooth"}),
])
def test_tags_name_tool_method_family_and_task(method: str, family: str, wanted: set[str], absent: set[str]) -> None:
    tags = card_tags(method, next(entry for entry in FAMILIES.values() if entry.name == family))
    assert {"kubetune", "diffusers", "text-to-image"} | wanted <= set(tags)
    assert not absent & set(tags)


@pytest.mark.parametrize(("names", "exported", "last", "expected"), [
    # the exported (best) step's samples when it was sampled
    (["step-2-0-0.png", "step-4-0-0.png", "step-4-1-0.png"], 2, 4, [(2, "step-2-0-0.png")]),
    # otherwise the newest sampled step's
    (["step-2-0-0.png", "step-4-1-0.png", "step-4-0-0.png"], 3, 4, [(4, "step-4-0-0.png"), (4, "step-4-1-0.png")]),
    # nothing past the last step trained; prompts no longer in the spec and other files are left out
    (["step-9-0-0.png", "step-3-7-0.png", "step-3-1-0.png", "notes.txt"], 4, 4, [(3, "step-3-1-0.png")]),
    # each prompt's first image before any second one
    (["step-1-0-1.png", "step-1-1-0.png", "step-1-0-0.png"], 1, 1,
     [(1, "step-1-0-0.png"), (1, "step-1-1-0.png"), (1, "step-1-0-1.png")]),
    ([], 1, 1, []),
])
def test_pick_samples(names: list[str], exported: int, last: int, expected: list[tuple[int, str]]) -> None:
    picked = pick_samples(_infos(*names), PROMPTS, exported, last)
    assert [(s.step, s.name) for s in picked] == expected
    assert all(s.prompt == PROMPTS[int(s.name.split("-")[2])] and s.url == f"images/{s.name}" for s in picked)


def test_pick_samples_stops_at_max_widgets() -> None:
    names = [f"step-5-{p}-{i}.png" for p in range(2) for i in range(MAX_WIDGETS)]
    picked = pick_samples(_infos(*names), PROMPTS, 5, 5)
    assert len(picked) == MAX_WIDGETS
    assert [s.name for s in picked[:4]] == ["step-5-0-0.png", "step-5-1-0.png", "step-5-0-1.png", "step-5-1-1.png"]


def test_publish_copies_the_shown_samples_and_drops_an_earlier_exports_images(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    store, out = LocalStore(), tmp_path / "out"
    for name in ("step-2-0-0.png", "step-4-0-0.png"):
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "samples" / name).write_bytes(name.encode())
    (out / "final" / "images").mkdir(parents=True)
    (out / "final" / "images" / "step-2-0-0.png").write_bytes(b"old")
    samples = pick_samples(store.list(f"{out}/samples/"), PROMPTS, 4, 4)
    uri = publish_card(ModelCard("---\nbase_model: b\n---\n# c\n"), samples, store, f"{out}/final/", tmp_path / "w")
    assert uri == f"{out}/final/README.md" and ModelCard.load(uri).data.base_model == "b"
    assert [p.name for p in (out / "final" / "images").iterdir()] == ["step-4-0-0.png"]
    assert (out / "final" / "images" / "step-4-0-0.png").read_bytes() == b"step-4-0-0.png"
    assert not (tmp_path / "w").exists()


def _run(job: Any, root: Path) -> Any:
    result = run_job(job, RuntimeConfig(scratch=root / "scratch", status_file=root / "status.json", log_every=0))
    assert (result.phase, result.exit_code) == ("Succeeded", 0), result.message
    return result


def _check_card(folder: Path, base_model: str) -> Any:
    """Load the card as the Hub would, and check what every card must hold; return it for more checks."""
    from huggingface_hub import ModelCard
    from PIL import Image

    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.base_model == base_model
    assert (data.library_name, data.pipeline_tag) == ("diffusers", "text-to-image")
    assert {"kubetune", "diffusers", "text-to-image"} <= set(data.tags)
    assert data.license is None and "licence" in card.text.lower()
    widgets = data.get("widget") or []
    assert widgets, "the run sampled, so the card shows its samples"
    assert {w["text"] for w in widgets} == set(PROMPTS)
    for widget in widgets:
        image = folder / widget["output"]["url"]
        assert image.parent == folder / "images" and image.is_file(), widget
        with Image.open(image) as opened:
            opened.verify()
    return card


@pytest.fixture(scope="module")
def lora_run(tiny_sd: Path, squares: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("card-lora")
    job = local_job(str(tiny_sd), str(squares), str(root / "out"),
                    validation={"prompts": PROMPTS, "every": 2, "inferenceSteps": 1})
    return {"result": _run(job, root), "final": root / "out" / "final", "base": str(tiny_sd)}


def test_lora_card_names_base_model_and_shows_the_last_samples(lora_run: dict[str, Any]) -> None:
    final = lora_run["final"]
    card = _check_card(final, lora_run["base"])
    assert {"lora", "stable-diffusion"} <= set(card.data.tags) and card.data.get("instance_prompt") is None
    assert sorted(p.name for p in (final / "images").iterdir()) == ["step-4-0-0.png", "step-4-1-0.png"]
    assert "pipe.load_lora_weights(" in card.text and 'weight_name="pytorch_lora_weights.safetensors"' in card.text
    assert "test-lora.safetensors" in card.text and "<lora:test-lora:1>" in card.text
    assert "| Steps trained | 4 |" in card.text and "| Exported step | 4" in card.text
    assert "| Training images | 6 |" in card.text


def test_card_sits_beside_the_weights_it_describes(lora_run: dict[str, Any]) -> None:
    outputs = lora_run["result"].progress["outputs"]
    final = lora_run["final"]
    assert Path(outputs["lora"]["diffusers"]).parent == final == Path(outputs["lora"]["kohya"]).parent
    assert (final / "README.md").is_file()


def test_dreambooth_lora_card_names_the_trigger_words(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), method=DREAMBOOTH,
                    training={"maxSteps": 2},
                    validation={"prompts": PROMPTS, "every": 100, "inferenceSteps": 1, "imagesPerPrompt": 2})
    _run(job, tmp_path)
    final = tmp_path / "out" / "final"
    card = _check_card(final, str(tiny_sd))
    assert card.data.instance_prompt == "a photo of sks square"
    assert {"lora", "dreambooth"} <= set(card.data.tags)
    assert len(card.data.widget) == 4
    assert "trigger words `a photo of sks square`" in card.text
    assert 'pipe("a photo of sks square")' in card.text


def test_card_shows_the_exported_best_step_and_its_samples(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    """With a validation split the export is the best step's (`outputs.step`); the card says which and why, and
    its gallery is that step's samples (validation and sampling share `validation.every`). The learning rate
    makes validation loss rise again before the end (as in test_best_weights), so the best is not the last."""
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), data={"validationFraction": 0.2},
                    training={"maxSteps": 10, "learningRate": 10.0},
                    validation={"prompts": PROMPTS, "every": 2, "inferenceSteps": 1})
    outputs = _run(job, tmp_path).progress["outputs"]
    step = outputs["step"]
    assert outputs["reason"] == "BestValidationLoss" and step < 10
    final = tmp_path / "out" / "final"
    card = _check_card(final, str(tiny_sd))
    urls = {w["output"]["url"] for w in card.data.widget}
    assert urls == {f"images/step-{step}-0-0.png", f"images/step-{step}-1-0.png"}, step
    assert "| Steps trained | 10 |" in card.text
    assert f"| Exported step | {step}: it had the lowest validation loss" in card.text
    assert "| Training images | 5 (1 more held out for validation) |" in card.text


def test_full_fine_tune_card_points_at_the_pipeline_folder(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    """Without sample prompts the card has no gallery; its snippet loads the pipeline folder beside it."""
    from huggingface_hub import ModelCard

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), method={"type": "full", "lora": None},
                    training={"maxSteps": 1})
    _run(job, tmp_path)
    final = tmp_path / "out" / "final"
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == str(tiny_sd) and card.data.get("widget") is None
    assert "full-fine-tune" in card.data.tags and "lora" not in card.data.tags
    assert 'DiffusionPipeline.from_pretrained("path/to/this/folder/pipeline"' in card.text
    assert (final / "pipeline" / "model_index.json").is_file() and "<Gallery />" not in card.text
    assert "convert_diffusers_to_original_stable_diffusion.py" in card.text


@pytest.mark.integration
def test_card_on_s3_names_no_storage_details(tiny_sd: Path, squares: Path, s3_server: Any, s3_bucket: str,
                                             tmp_path: Path) -> None:
    """Samples reach `final/images/` through the S3 store; the card names no endpoint, bucket or Secret."""
    from kubetune.api.spec import StorageSpec
    from kubetune_trainer.storage.s3 import S3Store
    from kubetune_trainer.storage.staging import Stager

    storage = {"endpoint": s3_server.endpoint, "addressingStyle": "path", "secretRef": {"name": "card-secret"}}
    job = local_job(str(tiny_sd), str(squares), f"s3://{s3_bucket}/out/", method=DREAMBOOTH, storage=storage,
                    training={"maxSteps": 2}, validation={"prompts": PROMPTS, "every": 100, "inferenceSteps": 1})
    _run(job, tmp_path)
    store = S3Store(StorageSpec(endpoint=s3_server.endpoint, addressing_style="path"))
    Stager(store).stage_prefix(f"s3://{s3_bucket}/out/final/", tmp_path / "final")
    card = _check_card(tmp_path / "final", str(tiny_sd))
    assert card.data.instance_prompt == "a photo of sks square"
    text = (tmp_path / "final" / "README.md").read_text()
    for secret in (s3_server.endpoint, "127.0.0.1", s3_bucket, "card-secret", "s3://"):
        assert secret not in text
