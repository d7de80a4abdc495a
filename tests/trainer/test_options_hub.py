"""hf:// staging fetches only the files `model.variant` loads and sends the token from
`model.tokenSecretRef` (HF_TOKEN); a gated repository without a token is a configuration error.

The Hub is `hub_server.LoopbackHub` on loopback. huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported (this test session runs offline), so staging runs in a child
process with the environment a trainer pod has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import HubRepo, LoopbackHub
from trainer_support import job_document

from kubetune_trainer.storage.hub import hub_files

PIPELINE = [
    "model_index.json", "v1-5-pruned.ckpt", "README.md",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.msgpack",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
    "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.fp16.json",
    "text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors",
    "tokenizer/vocab.json", "onnx/unet/model.onnx",
]
COMMON = ["README.md", "model_index.json", "text_encoder/config.json", "tokenizer/vocab.json", "unet/config.json",
          "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]  # the VAE has no fp16 files: plain ones
FP16 = ["text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
PLAIN = ["text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
         "text_encoder/model.safetensors.index.json", "unet/diffusion_pytorch_model.safetensors"]
TOKEN = "hf_loopback_token"


@pytest.mark.parametrize(("variant", "want"), [(None, COMMON + PLAIN), ("fp16", COMMON + FP16),
                                               ("bf16", COMMON + PLAIN)])
def test_hub_files_are_what_the_variant_loads(variant: str | None, want: list[str]) -> None:
    assert hub_files(PIPELINE, variant) == sorted(want)


def test_pickled_weights_are_fetched_where_no_safetensors_exist() -> None:
    files = ["unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin"]
    assert hub_files(files, "fp16") == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.bin"]


def _env(hub: LoopbackHub, tmp_path: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def test_staging_fetches_only_the_variant_and_sends_the_token(tmp_path: Path) -> None:
    files = {name: f"content of {name}".encode() for name in PIPELINE}
    stage = ("import sys; from pathlib import Path; from kubetune.api.spec import StorageSpec; "
             "from kubetune_trainer.storage.schemes import stage; "
             "print(stage('hf://org/gated', Path(sys.argv[1]), StorageSpec(), variant='fp16').path)")
    with LoopbackHub({"org/gated": HubRepo(files, token=TOKEN)}) as hub:
        done = subprocess.run([sys.executable, "-c", stage, str(tmp_path / "model")], env=_env(hub, tmp_path, TOKEN),
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
    assert hub.fetched() == set(COMMON + FP16)
    assert {r.authorization for r in hub.requests if "org/gated" in r.path} == {f"Bearer {TOKEN}"}
    staged = Path(done.stdout.strip().splitlines()[-1])
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == sorted(COMMON + FP16)
    assert (staged / "unet/diffusion_pytorch_model.fp16.safetensors").read_bytes() == \
        files["unet/diffusion_pytorch_model.fp16.safetensors"]


def test_a_gated_repository_without_a_token_exits_78_naming_the_secret(tmp_path: Path, squares: Path) -> None:
    document = job_document("hf://org/gated", str(squares), str(tmp_path / "out"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    kubetune = Path(sys.executable).parent / "kubetune"
    with LoopbackHub({"org/gated": HubRepo({"model_index.json": b"{}"}, token=TOKEN)}) as hub:
        done = subprocess.run([str(kubetune), "run", str(tmp_path / "job.yaml"), "--no-progress",
                               "--scratch", str(tmp_path / "scratch"), "--status-file", str(tmp_path / "status.json")],
                              env=_env(hub, tmp_path, None), capture_output=True, text=True, timeout=300,
                              check=False)
    assert done.returncode == 78, done.stdout + done.stderr
    status = json.loads((tmp_path / "status.json").read_text(encoding="utf-8"))
    assert "model.tokenSecretRef" in status["message"] and "gated or private" in status["message"]
    assert hub.fetched() == set()


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_busy_hub_exits_75_to_be_retried(tmp_path: Path, squares: Path, status: int) -> None:
    """Rate limits and server errors pass: the pod is restarted (75), not the job failed for good (78)."""
    document = job_document("hf://org/busy", str(squares), str(tmp_path / "out"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    kubetune = Path(sys.executable).parent / "kubetune"
    with LoopbackHub({"org/busy": HubRepo({"model_index.json": b"{}"}, fail_with=status)}) as hub:
        done = subprocess.run([str(kubetune), "run", str(tmp_path / "job.yaml"), "--no-progress",
                               "--scratch", str(tmp_path / "scratch"), "--status-file", str(tmp_path / "status.json")],
                              env=_env(hub, tmp_path, None), capture_output=True, text=True, timeout=300,
                              check=False)
    assert done.returncode == 75, done.stdout + done.stderr
    status_file = json.loads((tmp_path / "status.json").read_text(encoding="utf-8"))
    assert status_file["message"].startswith("hf://org/busy: cannot fetch from the Hugging Face Hub")
    assert hub.fetched() == set()
