"""`kubetune demo`: the whole path on one machine with no GPU, no cluster and no network.

It builds a tiny random-weight SD pipeline and a synthetic captioned image set, serves
both from an S3-compatible server on loopback, runs a short LoRA job through the same
code as `kubetune run`, and copies the outputs to a local folder before the in-memory
server goes away.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import RunResult, run_job
from kubetune_trainer.loopback_s3 import DEMO_CREDENTIALS, LoopbackS3


def demo_document(endpoint: str, steps: int, family: str) -> dict[str, Any]:
    """The FineTuneJob the demo runs: tiny, CPU-friendly, checkpoints every few steps."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"demo-{family}-lora", "namespace": "demo"},
        "spec": {
            "model": {"uri": f"s3://models/tiny-{family}/"},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 4}},
            "data": {"uri": "s3://datasets/squares/", "resolution": 64},
            "storage": {"endpoint": endpoint, "region": "us-east-1", "addressingStyle": "path",
                        "maxConcurrency": 8},
            "output": {"uri": f"s3://outputs/demo-{family}-lora/", "checkpointEvery": max(1, steps // 4),
                       "keepCheckpoints": 2},
            "training": {"maxSteps": steps, "batchSize": 2, "learningRate": 1.0e-3,  # default precision: bf16
                         "lrScheduler": {"type": "constant_with_warmup", "warmupSteps": 2}, "seed": 7},
            "validation": {"prompts": ["a red square"], "every": steps, "inferenceSteps": 2},
            "resources": {"gpusPerNode": 0},
        },
    }


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


def _mirror(s3: LoopbackS3, bucket: str, dest: Path) -> list[str]:
    """Copy a whole bucket to `dest`; return the s3:// URIs that existed."""
    client, uris = s3.client(), []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            target = dest / item["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target))
            uris.append(f"s3://{bucket}/{item['Key']}")
    return uris


def run_demo(workdir: Path | None = None, steps: int = 12, family: str = "sd",
             progress_bar: bool = True) -> tuple[RunResult, Path]:
    """Run the demo in `workdir` (a fresh temporary folder by default)."""
    from kubetune.api.validation import validate_document
    from kubetune_trainer.job import quiet_libraries

    quiet_libraries()
    from kubetune_trainer.tiny import build_image_dataset, build_tiny_pipeline

    workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetune-demo-"))
    print(f"[demo] building a tiny random {family} pipeline and 8 captioned images in {workdir}", flush=True)
    build_tiny_pipeline(workdir / "source" / "model", family=family)
    build_image_dataset(workdir / "source" / "data", count=8, size=72)
    with demo_credentials(), LoopbackS3() as s3:
        for bucket in ("models", "datasets", "outputs"):
            s3.create_bucket(bucket)
        s3.upload_folder(workdir / "source" / "model", "models", f"tiny-{family}")
        s3.upload_folder(workdir / "source" / "data", "datasets", "squares")
        print(f"[demo] S3-compatible server on {s3.endpoint}", flush=True)
        job = validate_document(demo_document(s3.endpoint, steps, family), mode="local").job
        assert job is not None, "the demo's own job document must be valid"
        runtime = RuntimeConfig(scratch=workdir / "scratch", port=0, host="127.0.0.1",
                                status_file=workdir / "status.json", progress_bar=progress_bar)
        result = run_job(job, runtime)
        existing = _mirror(s3, "outputs", workdir / "outputs")
    _print_summary(result, existing, workdir)
    return result, workdir


def _print_summary(result: RunResult, existing: list[str], workdir: Path) -> None:
    found = set(existing)
    print("\n[demo] final status:\n" + json.dumps(result.as_dict(), indent=2))
    print(f"\n[demo] {result.phase}: {result.message} (exit code {result.exit_code})")
    for ref in result.progress.get("checkpoints", []):
        print(f"[demo] checkpoint step {ref['step']}: {ref['uri']}")
    outputs = result.progress.get("outputs") or {}
    for kind, uri in (outputs.get("lora") or {}).items():
        mark = "exists" if uri in found else "MISSING"
        print(f"[demo] LoRA {kind}: {uri} ({mark})")
    print(f"[demo] outputs copied to {workdir / 'outputs'} (the S3 server was in memory)")
    print(f"[demo] status: {workdir / 'status.json'}")
