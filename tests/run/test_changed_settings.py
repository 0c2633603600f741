"""Resuming into an output whose done images were made with other settings: the run refuses, saying what differs
and for how many images, or (data.on_changed_settings=remake) makes them again and records it. Never the two mixed
silently, which is what a resume keyed on the id alone did (tasks/outputs/drift.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ifbatch.tasks.outputs.drift import SettingsChanged
from ifbatch.tasks.outputs.manifest import part_paths, read_manifest
from ifbatch.tasks.storage import locate

from ..helpers import SMALL, cli, read_bytes, write_table
from .local import local_args, run_local

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_set(tiny_dir):
    return [f"tiny.dir={tiny_dir}"]


def test_best_of_4_into_a_best_of_1_output_is_refused_then_remade_on_request(tmp_path, tiny_set):
    """The dataset builder's case: 4 images made with k = 1, the output resumed with k = 4."""
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4]})
    out = str(tmp_path / "out")
    assert run_local(prompts, out, tiny_set).counts.done == 4
    before = {r["id"]: r["sha256"] for r in read_manifest(locate(out)).to_pylist()}
    with pytest.raises(SettingsChanged) as refused:
        run_local(prompts, out, [*tiny_set, "data.candidates_per_image=4"])
    assert "4 images" in str(refused.value) and "data.candidates_per_image 1 (this run: 4) for 4 images" in str(
        refused.value
    )
    assert {r["id"]: r["sha256"] for r in read_manifest(locate(out)).to_pylist()} == before  # nothing touched
    # the same from the command line: exit 2, one line, before any model loads
    res = cli(*local_args(prompts, out, [*tiny_set, "data.candidates_per_image=4"]), timeout=300)
    assert res.returncode == 2 and "data.candidates_per_image 1 (this run: 4) for 4 images" in res.stderr, res.stderr
    # remake: the 4 are made again with best of 4, said and recorded
    summary = run_local(prompts, out, [*tiny_set, "data.candidates_per_image=4", "data.on_changed_settings=remake"])
    assert (summary.counts.done, summary.counts.skipped) == (4, 0)
    records = read_manifest(locate(out)).to_pylist()
    assert {r["candidates_per_image"] for r in records} == {4} and all(len(r["candidate_scores"]) == 4 for r in records)
    record = json.loads(read_bytes(summary.run_record))
    assert record["changed_settings"]["images"] == 4
    assert record["changed_settings"]["changes"] == [
        {"setting": "data.candidates_per_image", "before": 1, "now": 4, "images": 4}
    ]
    # and now the output is of one recipe: a rerun with k = 4 skips everything, saying nothing of settings
    again = run_local(prompts, out, [*tiny_set, "data.candidates_per_image=4"])
    assert (again.counts.done, again.counts.skipped) == (0, 4)


def test_each_setting_that_shapes_an_image_is_named_with_its_count(tmp_path, tiny_set):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:3], "stage_1_steps": [None, None, 6]})
    out = str(tmp_path / "out")
    run_local(prompts, out, tiny_set)
    cases = {
        "stage_1.steps=5": "stage_1.steps (column stage_1_steps) 4 (this run: 5) for 2 images",
        "stage_3.guidance_scale=3.5": "stage_3.guidance_scale (column stage_3_guidance_scale) 9.0 (this run: 3.5) "
        "for 3 images",
        "seed=9": "seed",
        "safety.watermark=false": "safety.watermark True (this run: False) for 3 images",
        "stage_2.dtype=bfloat16": "stage_2.dtype 'float32' (this run: 'bfloat16') for 3 images",
        "text_encoder.clean_caption=true": "text_encoder.clean_caption (text_preprocessing) 'lower-strip' (this "
        "run: 'clean-caption') for 3 images",
    }
    for override, words in cases.items():
        with pytest.raises(SettingsChanged, match="were made with other settings") as refused:
            run_local(prompts, out, [*tiny_set, override])
        assert words in str(refused.value), (override, str(refused.value))
    # the table's own override kept: row 2 still asks for 6 steps, and a config of 5 steps changes only the others
    assert "for 2 images" in cases["stage_1.steps=5"]


def test_images_an_older_ifbatch_made_from_the_raw_prompt_are_told_apart(tmp_path, tiny_set):
    """Records from before text preprocessing was recorded (null): their prompts reached T5 as given. Those the
    preprocessing leaves as they are were the same embeddings; the ones with capitals were not."""
    prompts = write_table(tmp_path / "p.parquet", {"prompt": ["a photo of a cat", "A Red Car in the Rain"]})
    out = str(tmp_path / "out")
    run_local(prompts, out, tiny_set)
    for path in part_paths(locate(out)):  # as an older ifbatch wrote them
        t = pq.read_table(path)
        i = t.schema.get_field_index("text_preprocessing")
        pq.write_table(t.set_column(i, t.schema.field(i), pa.nulls(t.num_rows, pa.string())), path)
    with pytest.raises(SettingsChanged) as refused:
        run_local(prompts, out, tiny_set)
    assert str(refused.value).startswith("1 image in") and (
        "text_encoder.clean_caption (text_preprocessing) 'as given' (this run: 'lower-strip') for 1 image."
    ) in str(refused.value)
    summary = run_local(prompts, out, [*tiny_set, "data.on_changed_settings=remake"])
    assert (summary.counts.done, summary.counts.skipped) == (1, 1)
    by_prompt = {r["prompt"]: r for r in read_manifest(locate(out)).to_pylist()}
    assert by_prompt["A Red Car in the Rain"]["text_preprocessing"] == "lower-strip"


def test_a_webdataset_output_is_not_remade_in_place(tmp_path, tiny_set):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    out, wds = str(tmp_path / "out"), [*tiny_set, "output.format=webdataset"]
    run_local(prompts, out, wds)
    with pytest.raises(SettingsChanged, match="remaking them in place is for output.format=files"):
        run_local(prompts, out, [*wds, "stage_1.steps=5", "data.on_changed_settings=remake"])


def test_unrecorded_images_are_taken_over_only_when_this_run_would_make_them_so(tmp_path, tiny_set):
    """A run killed before recording its images (its records removed, its mark on the output left, as SIGKILL
    leaves them). The rerun with other steps for one row makes that row's image again (its file replaced) and takes
    over the others as they are."""
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:3]})
    out = tmp_path / "out"
    first = run_local(prompts, str(out), tiny_set)
    assert first.counts.done == 3
    made = {r["id"]: r for r in read_manifest(locate(str(out))).to_pylist()}
    for p in part_paths(locate(str(out))):  # killed before its records were written
        locate(str(out)).fs.rm_file(p)
    (out / "runs" / f"{first.run_id}.open").write_text("{}")
    (out / "runs" / f"{first.run_id}.json").unlink()
    changed = write_table(tmp_path / "q.parquet", {"prompt": SMALL[:3], "stage_1_steps": [None, None, 6]})
    summary = run_local(changed, str(out), tiny_set)
    assert (summary.counts.adopted, summary.counts.done, summary.counts.skipped) == (2, 1, 0)
    now = {r["id"]: r for r in read_manifest(locate(str(out))).to_pylist()}
    ids = sorted(made, key=lambda i: SMALL.index(made[i]["prompt"]))  # in the table's order
    assert [now[i]["sha256"] == made[i]["sha256"] for i in ids] == [True, True, False]
    assert now[ids[2]]["stage_1_steps"] == 6 and now[ids[0]]["run_id"] == summary.run_id
    assert not list((out / "runs").glob("*.open"))
