"""The validator: valid jobs pass, and each invalid job fails naming the field at fault."""

from __future__ import annotations

import pytest

from kubetune.api.validation import load_documents, validate_document
from tests.unit.jobs import job

DREAMBOOTH = {"instancePrompt": "a photo of sks dog", "classPrompt": "a photo of a dog"}

# (id, document, field path the problem must name, a word the message must contain)
INVALID = [
    ("wrong-api-version", job().set("apiVersion", "kubetune.io/v1").obj(), "apiVersion", "kubetune.io/v1alpha1"),
    ("wrong-kind", job().set("kind", "FineTuningJob").obj(), "kind", "FineTuneJob"),
    ("missing-spec", job().drop("spec").obj(), "spec", "required"),
    ("missing-model", job().drop("spec.model").obj(), "spec.model", "required"),
    ("missing-data-uri", job().drop("spec.data.uri").obj(), "spec.data.uri", "required"),
    ("empty-data-uri", job().set("spec.data.uri", "").obj(), "spec.data.uri", "at least 1"),
    ("missing-output", job().drop("spec.output").obj(), "spec.output", "required"),
    ("unknown-method", job().set("spec.method.type", "qlora").obj(), "spec.method.type", "dreambooth-lora"),
    ("method-not-mapping", job().set("spec.method", "lora").obj(), "spec.method", "dictionary"),
    ("unknown-field", job().set("spec.training.maxStep", 10).obj(), "spec.training.maxStep", "maxSteps"),
    ("negative-steps", job().set("spec.training.maxSteps", -5).obj(), "spec.training.maxSteps", "greater than"),
    ("steps-as-string", job().set("spec.training.maxSteps", "100").obj(), "spec.training.maxSteps", "integer"),
    ("steps-and-epochs", job().set("spec.training.epochs", 3).obj(), "spec.training.maxSteps", "exactly one"),
    ("neither-steps-nor-epochs", job().drop("spec.training.maxSteps").obj(), "spec.training.maxSteps", "exactly one"),
    ("zero-batch", job().set("spec.training.batchSize", 0).obj(), "spec.training.batchSize", "greater than"),
    ("zero-lr", job().set("spec.training.learningRate", 0).obj(), "spec.training.learningRate", "greater than"),
    ("bad-precision", job().set("spec.training.mixedPrecision", "fp8").obj(), "spec.training.mixedPrecision", "bf16"),
    ("bad-optimizer", job().set("spec.training.optimizer", "sgd").obj(), "spec.training.optimizer", "adamw"),
    ("bad-scheduler", job().set("spec.training.lrScheduler", {"type": "cos"}).obj(), "spec.training.lrScheduler.type", "cosine"),
    ("warmup-past-end", job().set("spec.training.lrScheduler", {"warmupSteps": 100}).obj(), "spec.training.lrScheduler.warmupSteps", "less than"),
    ("bad-uri-scheme", job().set("spec.model.uri", "gs://models/sd15/").obj(), "spec.model.uri", "s3://"),
    ("local-path-on-cluster", job().set("spec.data.uri", "/home/me/corgis").obj(), "spec.data.uri", "plain path"),
    ("hf-dataset", job().set("spec.data.uri", "hf://lambdalabs/pokemon").obj(), "spec.data.uri", "s3://"),
    ("bad-bucket", job().set("spec.output.uri", "s3://Out_Puts/x/").obj(), "spec.output.uri", "bucket"),
    ("bad-hf-repo", job().set("spec.model.uri", "hf://just-a-name").obj(), "spec.model.uri", "hf://org/name"),
    ("output-inside-data", job().set("spec.output.uri", "s3://datasets/corgis/out/").obj(), "spec.output.uri", "inside"),
    ("resolution-not-multiple-of-8", job().set("spec.data.resolution", 500).obj(), "spec.data.resolution", "multiple of 8"),
    ("resolution-too-small", job().set("spec.data.resolution", 32).obj(), "spec.data.resolution", "greater than"),
    ("bad-format", job().set("spec.data.format", "webdataset").obj(), "spec.data.format", "imagefolder"),
    ("validation-fraction-too-big", job().set("spec.data.validationFraction", 0.9).obj(), "spec.data.validationFraction", "less than"),
    ("dreambooth-without-section", job().set("spec.method.type", "dreambooth").obj(), "spec.method.dreambooth", "instancePrompt"),
    ("dreambooth-without-prompt", job().set("spec.method", {"type": "dreambooth-lora", "dreambooth": {"classPrompt": "a dog"}}).obj(), "spec.method.dreambooth.instancePrompt", "required"),
    ("prior-without-class-prompt", job().set("spec.method", {"type": "dreambooth", "dreambooth": {"instancePrompt": "sks"}}).obj(), "spec.method.dreambooth.classPrompt", "priorPreservation"),
    ("dreambooth-section-on-lora", job().set("spec.method.dreambooth", DREAMBOOTH).obj(), "spec.method.dreambooth", "applies only"),
    ("lora-section-on-full", job().set("spec.method", {"type": "full", "lora": {}}).obj(), "spec.method.lora", "applies only"),
    ("lora-rank-zero", job().set("spec.method.lora", {"rank": 0}).obj(), "spec.method.lora.rank", "greater than"),
    ("lora-dropout-one", job().set("spec.method.lora", {"dropout": 1.0}).obj(), "spec.method.lora.dropout", "less than"),
    ("no-target-modules", job().set("spec.method.lora", {"targetModules": []}).obj(), "spec.method.lora.targetModules", "at least 1"),
    ("keep-zero-checkpoints", job().set("spec.output.keepCheckpoints", 0).obj(), "spec.output.keepCheckpoints", "greater than"),
    ("kohya-for-full", job().set("spec.method.type", "full").set("spec.output.formats", ["kohya"]).obj(), "spec.output.formats", "LoRA"),
    ("bad-output-format", job().set("spec.output.formats", ["ckpt"]).obj(), "spec.output.formats[0]", "kohya"),
    ("ema-on-lora", job().set("spec.training.ema", {"decay": 0.999}).obj(), "spec.training.ema", "full"),
    ("ema-decay-one", job().set("spec.method.type", "full").set("spec.training.ema", {"decay": 1.0}).obj(), "spec.training.ema.decay", "less than"),
    ("fsdp-for-lora", job().set("spec.training.parallelism", "fsdp").obj(), "spec.training.parallelism", "full fine-tune"),
    ("fsdp-settings-without-fsdp", job().set("spec.method.type", "full").set("spec.training.fsdp", {}).obj(), "spec.training.fsdp", "parallelism"),
    ("ema-with-fsdp", job().set("spec.method.type", "full").set("spec.training.parallelism", "fsdp").set("spec.training.ema", {}).obj(), "spec.training.ema", "fsdp"),
    ("fsdp-offload-on-cpu", job().set("spec.method.type", "full").set("spec.resources.gpusPerNode", 0).set("spec.training.parallelism", "fsdp").set("spec.training.fsdp", {"cpuOffload": True}).obj(), "spec.training.fsdp.cpuOffload", "GPUs"),
    ("fsdp-with-prodigy", job().set("spec.method.type", "full").set("spec.training.parallelism", "fsdp").set("spec.training.optimizer", "prodigy").obj(), "spec.training.optimizer", "adamw"),
    ("bad-parallelism", job().set("spec.training.parallelism", "zero3").obj(), "spec.training.parallelism", "fsdp"),
    ("bad-timestep-sampling", job().set("spec.training.flowMatching", {"timestepSampling": "beta"}).obj(), "spec.training.flowMatching.timestepSampling", "logit_normal"),
    ("long-t5-sequence", job().set("spec.model.maxSequenceLength", 1024).obj(), "spec.model.maxSequenceLength", "less than"),
    ("early-stopping-without-holdout", job().set("spec.training.earlyStopping", {}).obj(), "spec.training.earlyStopping", "validationFraction"),
    ("fp16-on-cpu", job().set("spec.resources.gpusPerNode", 0).set("spec.training.mixedPrecision", "fp16").obj(), "spec.training.mixedPrecision", "GPU"),
    ("zero-nodes", job().set("spec.resources.nodes", 0).obj(), "spec.resources.nodes", "greater than"),
    ("bad-memory-quantity", job().set("spec.resources.memory", "64 gigs").obj(), "spec.resources.memory", "pattern"),
    ("bad-endpoint", job().set("spec.storage.endpoint", "minio:9000").obj(), "spec.storage.endpoint", "http"),
    ("bad-addressing", job().set("spec.storage.addressingStyle", "dns").obj(), "spec.storage.addressingStyle", "virtual"),
    ("secret-ref-without-name", job().set("spec.storage.secretRef", {}).obj(), "spec.storage.secretRef.name", "required"),
    ("negative-backoff", job().set("spec.runPolicy.backoffLimit", -1).obj(), "spec.runPolicy.backoffLimit", "greater than"),
    ("bad-toleration", job().set("spec.scheduling.tolerations", [{"operator": "Maybe"}]).obj(), "spec.scheduling.tolerations[0].operator", "Exists"),
    ("suspend-as-string", job().set("spec.runPolicy.suspend", "yes").obj(), "spec.runPolicy.suspend", "boolean"),
    ("uppercase-name", job().set("metadata.name", "Corgi_LoRA").obj(), "metadata.name", "DNS-1123"),
    ("name-too-long", job().set("metadata.name", "a" * 60).obj(), "metadata.name", "at most 50"),
]


@pytest.mark.parametrize(("doc", "path", "word"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_job_names_the_field(doc: dict, path: str, word: str) -> None:
    result = validate_document(doc)
    assert not result.ok and result.job is None
    named = [p for p in result.problems if p.path == path]
    assert named, f"no problem names {path}: {[str(p) for p in result.problems]}"
    assert any(word.lower() in p.message.lower() for p in named), [str(p) for p in named]


def test_catalogue_is_large_and_distinct() -> None:
    assert len(INVALID) >= 25
    assert len({c[0] for c in INVALID}) == len(INVALID)


def test_minimal_job_is_valid_and_defaults_fill_in() -> None:
    result = validate_document(job().obj())
    assert result.ok, result.problems
    spec = result.job.spec
    assert spec.data.resolution == 512
    assert spec.output.keep_checkpoints == 3
    assert spec.resources.gpus_per_node == 1
    assert spec.method.lora is None and spec.training.ema is None


def test_every_problem_is_reported_at_once() -> None:
    doc = job().set("spec.training.maxSteps", -1).set("spec.data.format", "x").set("spec.bogus", 1).obj()
    paths = {p.path for p in validate_document(doc).problems}
    assert {"spec.training.maxSteps", "spec.data.format", "spec.bogus"} <= paths


def test_local_mode_allows_paths_that_a_cluster_refuses() -> None:
    doc = job().set("spec.model.uri", "/models/sd15").set("spec.data.uri", "file:///data/corgis").set(
        "spec.output.uri", "./out").obj()
    assert not validate_document(doc, mode="cluster").ok
    assert validate_document(doc, mode="local").ok


def test_quantities_accept_integers_as_written() -> None:
    result = validate_document(job().set("spec.resources.cpu", 8).obj())
    assert result.ok and result.job.spec.resources.cpu == "8"


def test_yaml_reads_exponent_floats_like_kubectl() -> None:
    (doc,) = load_documents("a: 1e-4\nb: 2.5E+3\nc: '1e-4'\n")
    assert doc == {"a": 1e-4, "b": 2500.0, "c": "1e-4"}


def test_spec_is_read_only() -> None:
    spec = validate_document(job().obj()).job.spec
    with pytest.raises(Exception, match="frozen"):
        spec.training.max_steps = 5
