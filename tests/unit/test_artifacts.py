"""What the Prefect UI shows: prompt text is data, keys are valid, shares add up."""

from __future__ import annotations

from ifbatch.tasks.artifacts import artifact_key, counts_table, md_escape
from ifbatch.tasks.context import RunSummary


def test_prompt_text_cannot_inject_markdown_or_html():
    assert md_escape("**bold** <script>x</script> [a](b)\nnew") == r"\*\*bold\*\* \<script\>x\</script\> \[a\]\(b\) new"
    assert md_escape(None) == ""


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    assert artifact_key("20261129T084308Z-7311e4", "summary") == "ifbatch-summary-20261129t084308z-7311e4"


def test_counts_table_gives_each_stage_its_share():
    s = RunSummary(
        run_id="r",
        output="o",
        total=4,
        done=3,
        failed=1,
        rejected=0,
        skipped=0,
        seconds=10.0,
        startup_seconds=1.0,
        rows_per_second=0.4,
        run_record="x",
        rejected_file=None,
        stage_seconds_per_image={"stage_1": 1.0, "stage_3": 3.0},
    )
    rows = {r["what"]: r["value"] for r in counts_table(s)}
    assert rows["done"] == 3 and rows["stage_1 s/image"] == "1.000 (25%)" and rows["stage_3 s/image"] == "3.000 (75%)"
