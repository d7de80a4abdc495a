"""The data policy: unusable images are skipped, counted and named, or the job ends with exit 78 naming the file.

Each broken input is real bytes on disk: a caption that is not UTF-8, a PNG and a JPEG whose headers
claim 180 megapixels (PIL's own decompression-bomb limit, untouched), a JPEG cut in half, a
metadata.jsonl row naming a missing file, file names leading out of the dataset, a line that is not
JSON. The end-to-end tests run `kubetune train` and `kubetune run` on them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_support import job_document, local_job

from kubetune.api.spec import DataSpec
from kubetune.api.status import DataReport
from kubetune_demo.tiny import build_image_dataset
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.data import load_dataset
from kubetune_trainer.data_policy import TooManySkipped, check_image
from kubetune_trainer.exitcodes import EXIT_CONFIG, ConfigError
from kubetune_trainer.job import run_job

MEGAPIXELS_180 = (15000, 12000)


def _spec(root: Path, **kwargs: object) -> DataSpec:
    return DataSpec(uri=str(root), resolution=64, **{"aspect_buckets": False, **kwargs})


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png(size: tuple[int, int] = MEGAPIXELS_180) -> bytes:
    """A valid PNG header claiming `size`: a few hundred bytes that would decode to gigabytes."""
    header = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def small_jpeg(size: int = 64) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def huge_jpeg(size: tuple[int, int] = MEGAPIXELS_180) -> bytes:
    """A small JPEG whose frame header (SOF0) claims `size`."""
    data = bytearray(small_jpeg(16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", size[1], size[0])
    return bytes(data)


def truncated_jpeg() -> bytes:
    whole = small_jpeg()
    return whole[: len(whole) // 2]


def truncated_png() -> bytes:
    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()[: out.tell() // 2]


def _imagefolder(tmp_path: Path, extra_rows: list[str], count: int = 3) -> Path:
    """`count` good images in the imagefolder layout, with `extra_rows` (raw lines) appended to metadata.jsonl."""
    root = build_image_dataset(tmp_path / "data", count=count)
    with (root / "metadata.jsonl").open("a", encoding="utf-8", errors="surrogateescape") as metadata:
        metadata.writelines(row + "\n" for row in extra_rows)
    return root


def _row(name: str, caption: str = "a caption") -> str:
    return json.dumps({"file_name": name, "text": caption})


# --- what is skipped, and why -------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "reason"), [
    (huge_png(), "image too large to decode safely (Image size (180000000 pixels) exceeds limit"),
    (huge_jpeg(), "image too large to decode safely (Image size (180000000 pixels) exceeds limit"),
    (truncated_jpeg(), "truncated image"),
    (truncated_png(), "truncated image"),
    (b"<html>not an image</html>", "not an image"),
], ids=["180MP PNG", "180MP JPEG", "truncated JPEG", "truncated PNG", "not an image"])
def test_an_unusable_image_is_named_with_its_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's default: the production limit is what is tested
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.jpg").write_bytes(content)
    root = _imagefolder(tmp_path, [_row("bad.jpg")])
    reports: list[DataReport] = []
    dataset = load_dataset(root, _spec(root, max_skipped=1), on_report=reports.append)
    assert (len(dataset.examples), dataset.skipped) == (3, 1)
    assert [(s.file, s.reason[:len(reason)]) for s in dataset.skipped_files] == [("bad.jpg", reason)]
    assert (reports[0].images, reports[0].skipped, reports[0].max_skipped) == (3, 1, 1)


def test_a_180_megapixel_image_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    check = check_image(path)
    assert "180000000 pixels" in check.problem and check.size == (0, 0)


def test_a_row_naming_a_missing_file_is_skipped_with_its_line(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path, [_row("gone.png")])
    dataset = load_dataset(root, _spec(root, max_skipped=1))
    assert [(s.file, s.reason) for s in dataset.skipped_files] == [
        ("gone.png", "missing file (named by metadata.jsonl line 4)")]


def test_captions_that_are_not_utf8_or_empty_are_skipped(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path / "data", count=4, layout="captions")
    (root / "img-000.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1
    (root / "img-001.txt").write_text("  \n")
    (root / "img-002.txt").unlink()
    dataset = load_dataset(root, _spec(root, max_skipped=3))
    assert [(s.file, s.reason) for s in dataset.skipped_files] == [
        ("img-000.png", "caption img-000.txt is not UTF-8 (byte 0xe9 at offset 3)"),
        ("img-001.png", "caption img-001.txt is empty"),
        ("img-002.png", "no caption file img-002.txt")]
    assert [e.image.name for e in dataset.examples] == ["img-003.png"]


def test_a_metadata_caption_that_is_not_utf8_is_skipped_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(build_image_dataset(tmp_path / "one", count=1) / "img-000.png", tmp_path / "data" / "latin.png")
    root = _imagefolder(tmp_path, ['{"file_name": "latin.png", "text": "caf\udce9"}', _row("empty.png", " ")])
    shutil.copy(root / "latin.png", root / "empty.png")
    dataset = load_dataset(root, _spec(root, max_skipped=2))
    assert [(s.file, s.reason) for s in dataset.skipped_files] == [
        ("empty.png", "empty caption (metadata.jsonl line 5)"),
        ("latin.png", "caption is not UTF-8 (metadata.jsonl line 4)")]


def test_a_given_prompt_leaves_captions_unread(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path / "data", count=2, layout="captions")
    (root / "img-000.txt").write_bytes(b"\xff\xfe")
    dataset = load_dataset(root, _spec(root), caption="a photo of sks dog")
    assert [e.caption for e in dataset.examples] == ["a photo of sks dog"] * 2


# --- maxSkipped ---------------------------------------------------------------------------------------------


def test_more_skipped_than_max_skipped_fails_naming_the_first_few(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path, [_row(f"gone-{i}.png") for i in range(7)])
    reports: list[DataReport] = []
    with pytest.raises(TooManySkipped) as failure:
        load_dataset(root, _spec(root, max_skipped=6), on_report=reports.append)
    message = str(failure.value)
    assert failure.value.exit_code == EXIT_CONFIG
    assert "7 of 10 images skipped, more than data.maxSkipped (6)" in message
    assert "gone-0.png (missing file (named by metadata.jsonl line 4))" in message
    assert "gone-4.png" in message and "gone-5.png" not in message and "and 2 more" in message
    assert len(reports[0].skipped_files) == 7  # the report names all; its receivers keep the first few


def test_no_usable_images_names_what_was_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "a.txt").write_text("caption")
    with pytest.raises(ConfigError, match=r"no usable images: 1 skipped: a\.png \(not an image"):
        load_dataset(tmp_path, _spec(tmp_path, max_skipped=5))


# --- permanent errors: exit 78 naming the file and line ------------------------------------------------------


@pytest.mark.parametrize(("row", "message"), [
    (_row("/etc/hostname"), r"metadata\.jsonl line 4: file_name '/etc/hostname' is an absolute path"),
    (_row("../outside.png"), r"metadata\.jsonl line 4: file_name '\.\./outside\.png' contains '\.\.'"),
    (_row("sub/../../outside.png"), r"line 4: file_name 'sub/\.\./\.\./outside\.png' contains '\.\.'"),
    (_row("link.png"), r"metadata\.jsonl line 4: file_name 'link\.png' leads to .*outside\.png, outside the "
                       r"dataset folder"),
    ("{not json", r"metadata\.jsonl line 4 is not JSON"),
    ('["a.png", "caption"]', r"metadata\.jsonl line 4 is a JSON list, not an object"),
    (json.dumps({"file_name": 7, "text": "x"}), r"metadata\.jsonl line 4: file_name must be a non-empty string"),
], ids=["absolute", "dot-dot", "dot-dot inside", "symlink out", "not JSON", "not an object", "not a string"])
def test_a_metadata_row_that_cannot_be_right_is_a_config_error(tmp_path: Path, row: str, message: str) -> None:
    (tmp_path / "outside.png").write_bytes(small_jpeg())
    root = _imagefolder(tmp_path, [row])
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ConfigError, match=message) as failure:
        load_dataset(root, _spec(root, max_skipped=100))
    assert failure.value.exit_code == EXIT_CONFIG
    assert str(failure.value).startswith(f"{root}/metadata.jsonl line 4")


def test_a_symlink_inside_the_dataset_is_followed(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path, [_row("alias.png")])
    (root / "alias.png").symlink_to(root / "img-000.png")
    assert len(load_dataset(root, _spec(root)).examples) == 4


def test_a_symlinked_caption_leading_out_is_refused(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path / "data", count=1, layout="captions")
    (tmp_path / "secret.txt").write_text("not for training")
    (root / "img-000.txt").unlink()
    (root / "img-000.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ConfigError, match=r"img-000\.txt leads to .*secret\.txt, outside the dataset folder"):
        load_dataset(root, _spec(root))


# --- end to end: `kubetune train` and `kubetune run` ---------------------------------------------------------


def _broken_copy(squares: Path, tmp_path: Path) -> Path:
    """The six squares, plus a 180 MP PNG, a truncated JPEG, a non-UTF-8 caption and a missing file."""
    root = tmp_path / "data"
    shutil.copytree(squares, root)
    (root / "huge.png").write_bytes(huge_png())
    (root / "cut.jpg").write_bytes(truncated_jpeg())
    shutil.copy(root / "img-000.png", root / "latin.png")
    with (root / "metadata.jsonl").open("a", encoding="utf-8", errors="surrogateescape") as metadata:
        metadata.writelines(line + "\n" for line in [
            _row("huge.png"), _row("cut.jpg"), '{"file_name": "latin.png", "text": "caf\udce9"}', _row("gone.png")])
    return root


def _write_job(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_train_fails_with_78_naming_the_files_over_max_skipped(tmp_path: Path, squares: Path, tiny_sd: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.cli import main

    root = _broken_copy(squares, tmp_path)
    doc = job_document(str(tiny_sd), str(root), str(tmp_path / "out"), data={"maxSkipped": 3})
    termination = tmp_path / "termination-log"
    code = main(["train", "--config", str(_write_job(tmp_path, doc)), "--termination-log", str(termination),
                 "--scratch", str(tmp_path / "scratch"), "--port", "0", "--mode", "local"])
    out, err = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert "Traceback" not in err and "latin.png (caption is not UTF-8" in err.splitlines()[-1]
    message = json.loads(termination.read_text())
    assert (message["phase"], message["exitCode"], message["reason"]) == ("Failed", 78, "TooManySkippedImages")
    assert "4 of 10 images skipped, more than data.maxSkipped (3)" in message["message"]
    for name in ("cut.jpg (truncated image", "gone.png (missing file", "huge.png (image too large",
                 "latin.png (caption is not UTF-8"):
        assert name in message["message"]
    data = DataReport.model_validate(message["data"])
    assert (data.images, data.skipped, data.max_skipped) == (6, 4, 3)
    assert [f.file for f in data.skipped_files] == ["cut.jpg", "gone.png", "huge.png", "latin.png"]
    assert set(message["data"]) == {"images", "skipped", "maxSkipped", "skippedFiles"}
    logged = [line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("[kubetune]")]
    assert "data: 6 images, 4 skipped (data.maxSkipped 3)" in logged
    assert [line.split(":")[0] for line in logged if line.startswith("skipped ")] == [
        "skipped cut.jpg", "skipped gone.png", "skipped huge.png", "skipped latin.png"]


def test_run_skips_and_counts_within_max_skipped(tmp_path: Path, squares: Path, tiny_sd: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.cli import main

    root = _broken_copy(squares, tmp_path)
    doc = job_document(str(tiny_sd), str(root), str(tmp_path / "out"), data={"maxSkipped": 4},
                       training={"maxSteps": 2}, output={"checkpointEvery": 2})
    status = tmp_path / "status.json"
    code = main(["run", str(_write_job(tmp_path, doc)), "--status-file", str(status), "--no-progress",
                 "--scratch", str(tmp_path / "scratch")])
    out = capsys.readouterr().out
    result = json.loads(status.read_text())
    assert code == 0, result["message"]
    assert result["step"] == 2
    assert result["data"] == {"images": 6, "skipped": 4, "maxSkipped": 4, "skippedFiles": [
        {"file": "cut.jpg", "reason": result["data"]["skippedFiles"][0]["reason"]},
        {"file": "gone.png", "reason": "missing file (named by metadata.jsonl line 10)"},
        {"file": "huge.png", "reason": result["data"]["skippedFiles"][2]["reason"]},
        {"file": "latin.png", "reason": "caption is not UTF-8 (metadata.jsonl line 9)"}]}
    assert "data: 6 images, 4 skipped (data.maxSkipped 4)" in out
    assert "skipped cut.jpg: truncated image" in out and "skipped huge.png: image too large" in out


@pytest.mark.parametrize(("row", "named"), [
    (_row("/etc/hostname"), "metadata.jsonl line 7: file_name '/etc/hostname' is an absolute path"),
    (_row("../../job.yaml"), "metadata.jsonl line 7: file_name '../../job.yaml' contains '..'"),
    ('{"file_name": "img-000.png", "text": "unterminated}', "metadata.jsonl line 7 is not JSON"),
], ids=["absolute", "dot-dot", "not JSON"])
def test_run_ends_with_78_naming_the_metadata_line(tmp_path: Path, squares: Path, tiny_sd: Path, row: str,
                                                   named: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.cli import main

    root = tmp_path / "data"
    shutil.copytree(squares, root)
    with (root / "metadata.jsonl").open("a", encoding="utf-8") as metadata:
        metadata.write(row + "\n")
    doc = job_document(str(tiny_sd), str(root), str(tmp_path / "out"), data={"maxSkipped": 100})
    status = tmp_path / "status.json"
    code = main(["run", str(_write_job(tmp_path, doc)), "--status-file", str(status), "--no-progress",
                 "--scratch", str(tmp_path / "scratch")])
    err = capsys.readouterr().err
    result = json.loads(status.read_text())
    assert code == EXIT_CONFIG and "Traceback" not in err
    assert f"{root}/{named}" in err.splitlines()[-1] and f"{root}/{named}" in result["message"]
    assert (result["reason"], result["data"]) == ("InvalidConfiguration", None)  # nothing was counted


def test_a_file_name_that_is_not_utf8_is_named_printably(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path / "data", count=1, layout="captions")
    latin = root / "caf\udce9.png"  # the bytes b"caf\xe9.png" on disk
    latin.write_bytes(b"junk")
    latin.with_suffix(".txt").write_text("a broken image")
    dataset = load_dataset(root, _spec(root, max_skipped=1))
    assert [s.file for s in dataset.skipped_files] == ["caf\\xe9.png"]
    json.dumps(dataset.skipped_files[0].file).encode("utf-8")


# --- staged names: metadata.jsonl names the S3 key, staging may have shortened it -----------------------------

LONG_NAME = "a-very-long-photo-name-" + "x" * 210 + ".png"
"""Too long for staging to keep (over 200 bytes, with room for its temporary names), short enough for a disk."""


def test_a_long_name_finds_its_staged_file_for_s3_data(tmp_path: Path) -> None:
    from kubetune_trainer.storage.staging import local_relative

    root = _imagefolder(tmp_path, [_row(f"sub/{LONG_NAME}")])
    staged = root / local_relative(f"sub/{LONG_NAME}")
    assert staged.name != LONG_NAME
    staged.parent.mkdir()
    shutil.copy(root / "img-000.png", staged)
    dataset = load_dataset(root, _spec(root, max_skipped=0).model_copy(update={"uri": "s3://bucket/set/"}))
    assert staged in [e.image for e in dataset.examples]


def test_a_long_name_is_its_own_file_for_data_used_in_place(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path, [_row(LONG_NAME)])
    shutil.copy(root / "img-000.png", root / LONG_NAME)
    assert root / LONG_NAME in [e.image for e in load_dataset(root, _spec(root)).examples]


@pytest.mark.parametrize("name", ["sub//a.png", ".kubetune-staged/img-000.png.json"], ids=["empty segment", "marker"])
def test_a_name_staging_never_writes_is_a_config_error_for_s3_data(tmp_path: Path, name: str) -> None:
    root = _imagefolder(tmp_path, [_row(name)])
    with pytest.raises(ConfigError, match=rf"^s3://bucket/set/metadata\.jsonl line 4: file_name '{re.escape(name)}' "
                                          "cannot name a staged file"):
        load_dataset(root, _spec(root).model_copy(update={"uri": "s3://bucket/set/"}))


@pytest.mark.integration
def test_s3_data_with_a_long_name_trains_and_reports_each_skip(s3_server: Any, s3_bucket: str, tiny_sd: Path,
                                                               squares: Path, tmp_path: Path) -> None:
    s3_server.upload_folder(tiny_sd, s3_bucket, "model")
    s3_server.upload_folder(squares, s3_bucket, "data")
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key=f"data/{LONG_NAME}", Body=(squares / "img-000.png").read_bytes())
    client.put_object(Bucket=s3_bucket, Key="data/cut.jpg", Body=truncated_jpeg())
    rows = (squares / "metadata.jsonl").read_text() + _row(LONG_NAME) + "\n" + _row("cut.jpg") + "\n"
    client.put_object(Bucket=s3_bucket, Key="data/metadata.jsonl", Body=rows.encode())
    job = local_job(f"s3://{s3_bucket}/model/", f"s3://{s3_bucket}/data/", f"s3://{s3_bucket}/out/",
                    storage={"endpoint": s3_server.endpoint, "addressingStyle": "path"},
                    data={"maxSkipped": 1}, training={"maxSteps": 1})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", status_file=tmp_path / "status.json", log_every=0))
    assert result.exit_code == 0, result.message
    data = json.loads((tmp_path / "status.json").read_text())["data"]
    assert (data["images"], data["skipped"], [f["file"] for f in data["skippedFiles"]]) == (7, 1, ["cut.jpg"])
