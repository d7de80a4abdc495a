"""`kubetune demo`: the whole path on one machine with no GPU, no cluster and no network.

It builds a tiny random-weight SD pipeline and a synthetic captioned image set, serves
both from an S3-compatible server on loopback, runs a short LoRA job through the same
code as `kubetune run`, and copies what it made into a lasting local folder before the
in-memory server goes away: the job's outputs, the base pipeline it trained, the status.
Its last lines say where each thing is and print a snippet that loads the LoRA.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune_demo.loopback_s3 import DEMO_CREDENTIALS, LoopbackS3
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.job import RunResult, run_job

DEFAULT_OUT = Path("kubetune-demo")
"""Under the current directory: `make demo` leaves it in the checkout, beside the .venv whose Python
loads it, where a reboot does not clear it (a temp dir may be). Ignored by git."""
MARKER = ".kubetune-demo"
"""Written into the folder; only a folder holding it is replaced by the next demo."""
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
FAMILIES = {"sd": "SD 1.x", "sdxl": "SDXL", "sd3": "SD3.5", "flux": "Flux.1"}
PROMPT = "a red square"
INFERENCE_STEPS = 2
RESOLUTION = 64


def demo_document(endpoint: str, steps: int, family: str) -> dict[str, Any]:
    """The FineTuneJob the demo runs: tiny, CPU-friendly, checkpoints every few steps."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"demo-{family}-lora", "namespace": "demo"},
        "spec": {
            "model": {"uri": f"s3://models/tiny-{family}/"},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 4}},
            "data": {"uri": "s3://datasets/squares/", "resolution": RESOLUTION},
            "storage": {"endpoint": endpoint, "region": "us-east-1", "addressingStyle": "path",
                        "maxConcurrency": 8},
            "output": {"uri": output_uri(family), "checkpointEvery": max(1, steps // 4), "keepCheckpoints": 2},
            "training": {"maxSteps": steps, "batchSize": 2, "learningRate": 1.0e-3,  # default precision: bf16
                         "lrScheduler": {"type": "constant_with_warmup", "warmupSteps": 2}, "seed": 7},
            "validation": {"prompts": [PROMPT], "every": steps, "inferenceSteps": INFERENCE_STEPS},
            "resources": {"gpusPerNode": 0},
        },
    }


def output_uri(family: str) -> str:
    return f"s3://outputs/demo-{family}-lora/"


@contextmanager
def demo_credentials() -> Iterator[None]:
    """The loopback server's throwaway keys, so the demo never sends the user's real ones anywhere."""
    saved = {key: os.environ.get(key) for key in DEMO_CREDENTIALS}
    os.environ.update(DEMO_CREDENTIALS)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_out(out: Path) -> None:
    """Refuse, before any work, a folder the demo would have to replace but did not write."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out} is not empty and was not written by `kubetune demo`; "
                          "pass --out with a new or empty folder, or remove this one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; pass --out with a folder")


def _mirror(s3: LoopbackS3, uri: str, dest: Path) -> list[str]:
    """Copy every object under `uri` (s3://bucket/prefix/) into `dest`; return the URIs copied."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client, uris = s3.client(), []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            target = dest / item["Key"].removeprefix(prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target))
            uris.append(f"s3://{bucket}/{item['Key']}")
    return uris


def publish(outputs: Path, base: Path, status: Path, out: Path) -> None:
    """Assemble outputs (less the caches), base/ and status.json beside `out`, then swap it in:
    a failed copy leaves the previous demo's folder as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shutil.copytree(outputs, staging, dirs_exist_ok=True, ignore=lambda folder, names: (
            ["cache"] if Path(folder) == outputs else []))
        shutil.copytree(base, staging / "base")
        if status.is_file():
            shutil.copy2(status, staging / "status.json")
        (staging / MARKER).write_text("written by `kubetune demo`; the next demo replaces this folder\n",
                                      encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_demo(out: Path = DEFAULT_OUT, workdir: Path | None = None, steps: int = 12, family: str = "sd",
             progress_bar: bool = True) -> tuple[RunResult, Path]:
    """Run the demo, leave its results in `out`; return how the run ended and `out` made absolute.

    `workdir` holds the inputs, the S3 copy and the staging scratch: a temporary folder, removed at
    the end, unless one is given (then it is kept)."""
    out = Path(out).absolute()
    check_out(out)
    with tempfile.TemporaryDirectory(prefix="kubetune-demo-") as temporary:
        result = _run_in(Path(workdir or temporary), out, steps, family, progress_bar)
    print_summary(result, out, family)
    return result, out


def _run_in(workdir: Path, out: Path, steps: int, family: str, progress_bar: bool) -> RunResult:
    from kubetune.api.validation import validate_document
    from kubetune_trainer.job import quiet_libraries

    quiet_libraries()
    from kubetune_demo.tiny import build_image_dataset, build_tiny_pipeline

    print(f"[demo] building a tiny random {family} pipeline and 8 captioned images in {workdir}", flush=True)
    model = build_tiny_pipeline(workdir / "source" / "model", family=family)
    build_image_dataset(workdir / "source" / "data", count=8, size=72)
    with demo_credentials(), LoopbackS3() as s3:
        for bucket in ("models", "datasets", "outputs"):
            s3.create_bucket(bucket)
        s3.upload_folder(model, "models", f"tiny-{family}")
        s3.upload_folder(workdir / "source" / "data", "datasets", "squares")
        print(f"[demo] S3-compatible server in memory on {s3.endpoint}", flush=True)
        job = validate_document(demo_document(s3.endpoint, steps, family), mode="local").job
        assert job is not None, "the demo's own job document must be valid"
        runtime = RuntimeConfig(scratch=workdir / "scratch", port=0, host="127.0.0.1",
                                status_file=workdir / "status.json", progress_bar=progress_bar)
        result = run_job(job, runtime)
        _mirror(s3, output_uri(family), workdir / "outputs")
    publish(workdir / "outputs", model, workdir / "status.json", out)
    return result


def local_path(uri: str, family: str, out: Path) -> Path:
    """Where the copy in `out` of an object under the demo's output URI is."""
    return out / uri.removeprefix(output_uri(family))


def snippet(out: Path, family: str) -> list[str]:
    """Two lines a user pastes into the project's Python: load the base pipeline and the LoRA, make an image.
    Paths are JSON strings, which Python reads as the same string whatever characters they hold."""
    cls = PIPELINES[family]
    base, final, image = (json.dumps(str(out / name)) for name in ("base", "final", "lora-sample.png"))
    return [f"from diffusers import {cls}; pipe = {cls}.from_pretrained({base}); pipe.load_lora_weights({final})",
            f"pipe({json.dumps(PROMPT)}, num_inference_steps={INFERENCE_STEPS}, height={RESOLUTION}, "
            f"width={RESOLUTION}).images[0].save({image})"]


def summary_lines(result: RunResult, out: Path, family: str) -> list[str]:
    """The last lines of the demo: the outcome, each local path that exists, and the snippet."""
    outputs = result.progress.get("outputs") or {}
    exported = f"exported: step {outputs['step']}, {outputs['reason']}" if outputs.get("step") else ""
    notes = {"diffusers": exported, "kohya": "one file for ComfyUI (and A1111)"}
    rows = [(f"LoRA ({kind})", local_path(uri, family, out), notes.get(kind, ""))
            for kind, uri in (outputs.get("lora") or {}).items()]
    rows += [("base pipeline", out / "base", f"the tiny random-weight {FAMILIES[family]} pipeline it trained"),
             ("report", out / "report" / "index.html", "open in a browser"),
             ("model card", out / "final" / "README.md", ""), ("samples", out / "samples", ""),
             ("checkpoints", out / "checkpoints", ""), ("status", out / "status.json", "")]
    lines = [f"[demo] {result.phase}: {result.message} (exit code {result.exit_code})",
             f"[demo] the S3 server was in memory and is gone; what it held is copied to {out}{os.sep}"]
    lines += [f"[demo]   {label:<17} {path}" + (f"  ({note})" if note else "")
              for label, path, note in rows if path.exists()]
    if (out / "final" / "pytorch_lora_weights.safetensors").is_file():
        lines += ["[demo] load the LoRA into the base pipeline and make an image: paste into .venv/bin/python", "",
                  *snippet(out, family)]
    return lines


def print_summary(result: RunResult, out: Path, family: str) -> None:
    print("\n[demo] final status:\n" + json.dumps(result.as_dict(), indent=2))
    print("\n" + "\n".join(summary_lines(result, out, family)), flush=True)
