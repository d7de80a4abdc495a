"""Every training method trains the tiny SD 1.x and SDXL pipelines end to end, and DreamBooth's
prior-preservation term shows on /metrics (`kubetune_trainer_loss_term{term="prior"}`) and /progress.

The status server is real HTTP on loopback; a step hook reads it while the run is live.
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from trainer_support import free_port, local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job

DREAMBOOTH = {"instancePrompt": "a photo of sks square", "classPrompt": "a photo of a square",
              "numClassImages": 2, "priorLossWeight": 0.5}
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"type": "lora"},
    "full": {"type": "full", "lora": None},
    "dreambooth": {"type": "dreambooth", "lora": None, "dreambooth": DREAMBOOTH},
    "dreambooth-lora": {"type": "dreambooth-lora", "dreambooth": DREAMBOOTH},
}
STEPS = 2


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def _samples(exposition: str, name: str) -> dict[str, float]:
    """`name`'s samples by their `term` label ('' when it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels.get("term", "")] = sample.value
    return found


def _trained_weights_changed(method: str, outputs: dict[str, Any], base: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    if "lora" in outputs:
        adapter = load_file(outputs["lora"]["diffusers"])
        return any(torch.count_nonzero(t) > 0 for key, t in adapter.items() if "lora_B" in key or "lora.up" in key)
    part = "unet" if (base / "unet").is_dir() else "transformer"
    name = f"{part}/diffusion_pytorch_model.safetensors"
    tuned, original = load_file(Path(outputs["pipeline"]) / name), load_file(base / name)
    return any(not torch.equal(tuned[key], original[key]) for key in original)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_family_end_to_end(method: str, family: str, squares: Path, tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    model: Path = request.getfixturevalue(f"tiny_{family}")
    spec = json.loads(json.dumps(METHODS[method]))
    if "dreambooth" in spec:
        spec["dreambooth"]["classDataUri"] = str(squares)
    job = local_job(str(model), str(squares), str(tmp_path / "out"), method=spec,
                    training={"maxSteps": STEPS, "learningRate": 1.0e-2})
    port, seen = free_port(), []
    runtime = RuntimeConfig(scratch=tmp_path / "s", port=port, host="127.0.0.1", log_every=0)
    result = run_job(job, runtime, hooks=[lambda _: seen.append((_get(port, "/metrics"),
                                                                 json.loads(_get(port, "/progress"))))])

    assert result.exit_code == 0, result.message
    assert result.progress["step"] == STEPS and len(seen) == STEPS
    assert _trained_weights_changed(method, result.progress["outputs"], model)
    metrics, progress = seen[-1]
    loss = _samples(metrics, "kubetune_trainer_step_loss")[""]
    terms = _samples(metrics, "kubetune_trainer_loss_term")
    if method.startswith("dreambooth"):
        assert set(terms) == {"instance", "prior"} and set(progress["lossTerms"]) == {"instance", "prior"}
        assert terms["prior"] > 0 and math.isfinite(terms["prior"])
        assert terms["instance"] + terms["prior"] == pytest.approx(loss, rel=1e-5)
        assert progress["lossTerms"]["prior"] == pytest.approx(terms["prior"], abs=1e-6)
    else:
        assert terms == {} and progress["lossTerms"] is None
