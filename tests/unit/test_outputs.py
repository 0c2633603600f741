"""Image paths, image bytes, durable writes and what the writer records, on a local folder."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ifbatch.configs import load_config
from ifbatch.configs.schema import CASCADE
from ifbatch.tasks.outputs.images import encode_image, image_relpath, read_provenance
from ifbatch.tasks.outputs.manifest import RECORD_SCHEMA
from ifbatch.tasks.outputs.writer import ImageWriter
from ifbatch.tasks.storage import locate
from tests.helpers import writer_rows


def test_image_paths_are_hashed_folders_of_the_configured_depth():
    out = load_config("tiny").output
    p = image_relpath("row-1", out)
    assert p == image_relpath("row-1", out) and p.endswith("/row-1.png") and len(p.split("/")) == 2 + out.shard_depth
    assert image_relpath("row-2", out) != p
    flat = load_config("tiny", ["output.shard_depth=0", "output.image_format=jpeg"]).output
    assert image_relpath("row-1", flat) == "images/row-1.jpg"


def test_png_bytes_decode_to_the_same_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = encode_image(pixels, load_config("tiny").output)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)


def test_local_writes_are_whole_and_leave_no_temporary_files(tmp_path):
    loc = locate(str(tmp_path / "out"))
    path = loc.path("a", "b", "f.bin")
    loc.write_bytes(path, b"first")
    loc.write_bytes(path, b"second")
    assert open(path, "rb").read() == b"second" and os.listdir(os.path.dirname(path)) == ["f.bin"]
    assert locate("s3://bucket/prefix/").uri("bucket/prefix/x") == "s3://bucket/prefix/x"


def writer_batch(n_ok: int):
    pixels = np.random.default_rng(1).integers(0, 256, (n_ok + 1, 8, 8, 3), dtype=np.uint8)
    return load_config("tiny"), writer_rows(pixels, failed=1)


def test_the_writer_records_ok_and_failed_rows_columnar(tmp_path):
    cfg, batch = writer_batch(2)
    t = ImageWriter(cfg, str(tmp_path), {"stage_1": {"commit": "abc"}}).__call__(batch)
    assert t.schema == RECORD_SCHEMA
    rows = t.to_pylist()
    for r, pixels in zip(rows[:2], batch["image"][:2], strict=True):
        data = open(r["image_uri"], "rb").read()
        assert (
            r["status"] == "ok"
            and r["sha256"] == hashlib.sha256(data).hexdigest()
            and (r["width"], r["height"]) == (8, 8)
        )
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels) and r["bytes"] == len(data)
        meta = read_provenance(data)  # the file says how it was made, found alone
        assert (meta["id"], meta["prompt"], meta["seed"], meta["prompt_id"]) == (r["id"], "p", r["seed"], r["id"])
        assert meta["params"]["stage_1_steps"] == 4 and meta["models"] == {"stage_1": {"commit": "abc"}}
        assert (r["nsfw"], r["watermark_detected"]) == (False, True) and r["seconds_stage_3"] == 0.1
    bad = rows[2]
    assert (bad["status"], bad["error"], bad["image_uri"], bad["nsfw"]) == (
        "failed",
        "stage_2: RuntimeError: boom",
        None,
        None,
    )
    assert bad["seconds_stage_3"] is None  # NaN (not run) is recorded as null
    assert set(json.loads(bad["placement"])) == set(CASCADE)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_format_carries_its_provenance_whatever_the_prompt(fmt):
    cfg = load_config("tiny", [f"output.image_format={fmt}"])
    meta = {"prompt": "un café ☕ à Zürich", "seed": 2**62, "models": {"stage_1": {"commit": "0123abc"}}}
    data = encode_image(np.zeros((16, 16, 3), np.uint8), cfg.output, meta)
    assert read_provenance(data) == meta
    if fmt == "png":
        assert Image.open(io.BytesIO(data)).text["Description"] == meta["prompt"]
    assert read_provenance(encode_image(np.zeros((16, 16, 3), np.uint8), cfg.output)) is None


@pytest.mark.parametrize(
    "prompt, negative", [("😀" * 10_000, ""), ("東京の夜景" * 600, "ぼやけた写真" * 450)], ids=["emoji", "cjk"]
)
@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_a_long_non_latin_prompt_fits_every_format_with_its_whole_record_kept(fmt, prompt, negative, tmp_path):
    """JPEG keeps EXIF in one 64 KB segment: the escaped prompts are cut in that copy, and say so; the manifest
    record (and a shard's .json) keep them whole. Pillow used to refuse: `EXIF data is too long`."""
    cfg = load_config("tiny", [f"output.image_format={fmt}"])
    meta = {"prompt": prompt, "negative_prompt": negative, "seed": 7, "models": {"stage_1": {"commit": "0123abc"}}}
    data = encode_image(np.zeros((16, 16, 3), np.uint8), cfg.output, meta)
    got = read_provenance(data)
    assert got["seed"] == 7 and got["models"] == meta["models"]
    if fmt == "jpeg" and got.get("exif_prompts_cut"):  # 10,000 emoji are 120 KB escaped: cut
        assert prompt.startswith(got["prompt"]) and len(got["prompt"]) >= 1000
        assert negative.startswith(got["negative_prompt"])
    else:
        assert got == meta and not (fmt == "jpeg" and prompt[0] == "😀")
    _, batch = writer_batch(1)
    batch["prompt"] = np.array([prompt, prompt], object)
    (ok, _) = ImageWriter(cfg, str(tmp_path)).__call__(batch).to_pylist()  # the writer's own path, end to end
    assert ok["status"] == "ok" and ok["prompt"] == prompt  # the manifest keeps it whole
    assert prompt.startswith(read_provenance(open(ok["image_uri"], "rb").read())["prompt"])


def test_verify_checks_an_output_where_it_is_now_after_a_copy(tmp_path):
    """An output copied elsewhere (records name the old place) is checked in its new place."""
    import shutil

    from ifbatch.tasks.outputs.manifest import write_part
    from ifbatch.tasks.outputs.verify import verify

    cfg, batch = writer_batch(3)
    old = tmp_path / "old"
    write_part(locate(str(old)), ImageWriter(cfg, str(old))(batch), "run1", "{}", 0)
    new = tmp_path / "new"
    shutil.copytree(old, new)
    shutil.rmtree(old / "images")  # the records' own paths are gone: only the copy counts
    report, _ = verify(locate(str(new)))
    assert report.whole and report.checked == 3, [p.line() for p in report.problems]
    victim = next((new / "images").rglob("r1.png"))
    victim.write_bytes(victim.read_bytes()[:-1])
    report, _ = verify(locate(str(new)))
    assert [(p.kind, p.id, p.uri) for p in report.problems] == [("corrupt", "r1", str(victim))]


def test_verify_says_what_an_interrupted_output_is_and_what_waits_in_the_spill_folder(tmp_path, capsys, monkeypatch):
    from ifbatch.flows import cli
    from ifbatch.tasks.outputs import spill
    from ifbatch.tasks.outputs.manifest import write_part

    monkeypatch.setattr(spill, "ROOT", tmp_path / "spill")
    early = tmp_path / "early"
    (early / "images" / "ab").mkdir(parents=True)
    (early / "images" / "ab" / "x.png").write_bytes(b"an image whose record was never written")
    assert cli.main(["verify", str(early), "--no-progress"]) == 1  # read, not refused: what it holds is listed
    said = capsys.readouterr()
    assert "not an ifbatch output" not in said.err
    assert f"orphan   {early / 'images' / 'ab' / 'x.png'} (no record names it; it cannot be read" in said.out

    cfg, batch = writer_batch(2)
    out = tmp_path / "out"
    write_part(locate(str(out)), ImageWriter(cfg, str(out))(batch), "run1", "{}", 0)
    loc = locate(str(out))
    spill.spill(loc, loc.path("manifest", "part-later.parquet"), b"records the store refused")
    assert cli.main(["verify", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "whole" in said and "note: 1 files" in said and str(spill.spill_dir(loc)) in said
