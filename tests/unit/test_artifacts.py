"""What the Prefect UI shows: prompt text is data, links are safe links to the path given, keys are valid, shares
add up."""

from __future__ import annotations

import dataclasses
import os

import pytest

from ifbatch.configs import load_config
from ifbatch.configs.costs import load_costs
from ifbatch.tasks.artifacts import artifact_key, counts_table, link, md_escape, plan_markdown
from ifbatch.tasks.run_record import Counts, RunParams, RunRecord
from ifbatch.tasks.stream.planner import plan


def record(counts: Counts, **fields) -> RunRecord:
    """A finished run's record, as the run makes it."""
    return RunRecord(
        run_id="r", output="o", status="done" if counts.failed == 0 else "failed", counts=counts,
        params=RunParams("p.parquet", "o"), config={"preset": "if-xl"}, started="", finished="",
        run_record="x", **fields,
    )  # fmt: skip


def test_prompt_text_cannot_inject_markdown_or_html():
    assert md_escape("**bold** <script>x</script> [a](b)\nnew") == r"\*\*bold\*\* \<script\>x\</script\> \[a\]\(b\) new"
    assert md_escape(None) == ""


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    assert artifact_key("20261129T084308Z-7311e4", "summary") == "ifbatch-summary-20261129t084308z-7311e4"


def test_counts_table_gives_each_stage_its_share():
    s = record(
        Counts(total=4, images=4, done=3, failed=1),
        seconds=10.0,
        startup_seconds=1.0,
        rows_per_second=0.4,
        stage_seconds_per_image={"stage_1": 1.0, "stage_3": 3.0},
    )
    rows = {r["what"]: r["value"] for r in counts_table(s)}
    assert rows["done"] == 3 and rows["stage_1 s/image"] == "1.000 (25%)" and rows["stage_3 s/image"] == "3.000 (75%)"


def test_the_summary_shows_the_plans_estimate_beside_the_measured_rate():
    p = plan(load_config("if-xl"), load_costs(), 2, "H200")
    s = record(
        Counts(total=40, images=40, done=40), seconds=300.0, startup_seconds=60.0, rows_per_second=0.2,
        stage_seconds_per_image={"stage_3": 3.1}, steady_rows_per_second=0.35, plan=p.record(),
    )  # fmt: skip
    md = "\n".join(plan_markdown(s))
    assert f"| images/s | {p.images_per_second:.3f} | 0.350 in steady state, 0.200 over the run |" in md
    assert "| stage_3: 2 x 0.51 GPU, batch 4, s/image | 2.870 | 3.100 (in the actor) |" in md
    rows = {r["what"]: r["value"] for r in counts_table(s)}
    assert rows["images/s the plan estimated"] == round(p.images_per_second, 3)
    assert (
        rows["GPU-s per kept image, 1 candidate an image (planned / this run)"]
        == f"{2 / p.images_per_second:.2f} / 5.71"
    )
    four = plan(load_config("if-xl", ["data.candidates_per_image=4"]), load_costs(), 2, "H200")
    kept_30 = dataclasses.replace(s.counts, filtered=10)  # 30 of 40 kept
    best = dataclasses.replace(s, plan=four.record(), counts=kept_30)
    rows = {r["what"]: r["value"] for r in counts_table(best)}
    assert rows["of them filtered (data.min_clip_score)"] == 10
    planned, measured = f"{four.gpu_seconds_per_image:.2f}", f"{2 / 0.35 * 40 / 30:.2f}"
    assert rows["GPU-s per kept image, 4 candidates an image (planned / this run)"] == (
        f"{planned} / {measured} ({four.candidate_cost:.2f}x k = 1)"
    )
    none = dataclasses.replace(s, plan={"mode": "none", "reason": "the Ray cluster has no GPUs"})
    assert plan_markdown(none) == ["No plan (none): the Ray cluster has no GPUs."]


def test_the_summary_names_a_split_and_a_re_plan():
    estimated = plan(load_config("if-xl"), load_costs(), 8, "L4")
    measured = {"text_encoder": 0.01, "stage_1": 9.0, "stage_2": 5.0, "stage_3": 20.0}
    p = plan(load_config("if-xl"), load_costs(), 8, "L4", measured=measured, measured_by="this run's first 64 images")
    replanned = p.record() | {"calibration": {"images": 64, "estimated": estimated.record(), "seconds_per_image": {}}}
    s = record(
        Counts(total=40, images=40, done=40), seconds=300.0, startup_seconds=60.0, rows_per_second=0.2,
        steady_rows_per_second=0.35, plan=replanned,
    )  # fmt: skip
    md = "\n".join(plan_markdown(s))
    assert "the GPUs are split 4 x (stage_3), 2 x (stage_1), 2 x (text_encoder + stage_2)" in md
    assert "Re-planned after the run's first 64 images" in md and f"{estimated.images_per_second:.3f} images/s" in md
    assert "costs from this run's first 64 images" in md


HOSTILE = [
    "/data/out (v2) <img src=x> [a](javascript:alert(1))",
    "My Drive/out",
    "s3://bucket/runs (2026)/nasty.parquet",
    "javascript:alert('path-link')//x",  # a relative path (a folder named so): a file link, encoded
    "javascript://x%0aalert(1)",  # a URI of another scheme: shown, not linked
    'out "quoted" & `ticks` *stars* _under_ |pipe| %41',
]


@pytest.mark.parametrize("path", HOSTILE)
def test_a_link_from_any_path_renders_as_one_safe_link_to_that_path(path):
    """Rendered by a CommonMark renderer (markdown-it, what Prefect's UI follows): one link, or none for a scheme
    that is not a file's or an object's, whose href is the path itself, percent-encoded; its text is the path."""
    from urllib.parse import unquote

    from markdown_it import MarkdownIt

    md = MarkdownIt()
    md.validateLink = lambda url: True  # (markdown-it itself refuses javascript: and file:; this checks ifbatch's)
    tokens = [t for b in md.parse(f"- output: {link(path)}") if b.children for t in b.children]
    hrefs = [t.attrGet("href") for t in tokens if t.type == "link_open"]
    shown = "".join(t.content for t in tokens if t.type in ("text", "code_inline"))
    assert not any(t.type.startswith("html") for t in tokens)  # no raw HTML got through
    if path.startswith("javascript://"):
        assert hrefs == [] and path in shown  # shown, not linked
        return
    assert len(hrefs) == 1 and hrefs[0].split(":", 1)[0] in ("file", "s3")
    want = path if "://" in path else "file://" + os.path.abspath(path)
    assert unquote(hrefs[0]) == want and " " not in hrefs[0]
    assert shown.endswith(path) or path.replace("`", "") in shown  # the text is the path as given
