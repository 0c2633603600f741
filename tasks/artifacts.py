"""What an operator sees in the Prefect UI: a live progress artifact, and at the end a counts table, a markdown
summary and a contact sheet (a PNG grid of the first images with their ids, written next to the outputs)."""

from __future__ import annotations

import io
import os
import re
import time
from typing import Any
from urllib.parse import quote

import pyarrow as pa
from PIL import Image, ImageDraw

from .outputs.formats import read_image
from .outputs.manifest import read_manifest
from .outputs.records import RUNS_DIR
from .run_record import RunRecord
from .storage import Location
from .stream.progress import Progress

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def md_escape(text: str | None) -> str:
    """Prompt text is data: escape every markdown and HTML meta character, flatten newlines."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text or "").split()))


def artifact_key(run_id: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]", "-", f"ifbatch-{what}-{run_id}".lower())


class LiveProgress:
    """A Prefect progress artifact updated at most every `every_s` seconds (and at the end)."""

    def __init__(self, run_id: str, total: int, every_s: float = 2.0):
        from prefect.artifacts import create_progress_artifact

        self.every_s, self.last = every_s, 0.0
        self.id = create_progress_artifact(
            progress=0.0,
            key=artifact_key(run_id, "progress"),
            description=f"ifbatch run {run_id}: images done of {total}",
        )

    def __call__(self, p: Progress) -> None:
        from prefect.artifacts import update_progress_artifact

        if time.monotonic() - self.last >= self.every_s or p.done + p.failed >= p.total:
            self.last = time.monotonic()
            pct = 100.0 * (p.done + p.failed) / p.total if p.total else 100.0
            update_progress_artifact(self.id, progress=pct, description=p.line())


WHERE = ["format", "image_uri", "shard", "member", "offset", "bytes"]  # what reading an image back needs


def run_records(loc: Location, parts: list[str]) -> pa.Table:
    """The run's own records (its manifest `parts`, not the whole output's), by input row: what the contact sheet
    and the summary's first rows show."""
    return read_manifest(loc, ["id", "row", "status", "prompt", *WHERE], paths=parts).sort_by("row")


def contact_sheet(
    loc: Location, run_id: str, records: pa.Table, n: int = 16, thumb: int = 128, columns: int = 4
) -> str | None:
    """A grid of the first `n` ok images of `records` (run_records) with their ids; written as
    runs/<run>-contact-sheet.png."""
    rows = [r for r in records.select(["id", "row", "status", *WHERE]).to_pylist() if r["status"] == "ok"][:n]
    if not rows:
        return None
    label = 14
    cols = min(columns, len(rows))
    sheet = Image.new("RGB", (cols * thumb, -(-len(rows) // cols) * (thumb + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(rows):
        with Image.open(io.BytesIO(read_image(loc, r))) as f:
            im = f.convert("RGB").resize((thumb, thumb))
        x, y = (k % cols) * thumb, (k // cols) * (thumb + label)
        sheet.paste(im, (x, y))
        draw.text((x + 2, y + thumb + 1), r["id"][:20], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    path = loc.path(RUNS_DIR, f"{run_id}-contact-sheet.png")
    loc.write_bytes(path, buf.getvalue())
    return loc.uri(path)


LINKED = ("file", "s3", "http", "https")  # the schemes a link may have; anything else is shown as text only
_TEXT_SPECIAL = re.compile(r"([\\`*_\[\]<>~|])")  # what means something inside a link's text


def link(uri: str | None) -> str:
    """A markdown link to a file or object, from a path or URI anyone who starts a run may have typed: its text
    escaped, its destination percent-encoded (spaces, parentheses, brackets, quotes and angle brackets cannot end
    or break it), and only for file:, s3: and http(s): -- `javascript:` and other schemes are shown, not linked."""
    if not uri:
        return "-"
    text = _TEXT_SPECIAL.sub(r"\\\1", " ".join(str(uri).split()))
    scheme, sep, rest = uri.partition("://")
    if not sep:  # a path: the file it names on this machine
        scheme, rest = "file", os.path.abspath(uri)
    scheme = scheme.lower()
    if scheme not in LINKED:
        return text
    keep = "/:@?=&%#+,;" if scheme.startswith("http") else "/"  # a URL's own syntax; a path's or key's characters
    return f"[{text}]({scheme}://{quote(rest, safe=keep)})"


def counts_table(s: RunRecord) -> list[dict[str, Any]]:
    total_stage, c = sum(s.stage_seconds_per_image.values()) or 1.0, s.counts
    rows: list[dict[str, Any]] = [
        {"what": k, "value": v}
        for k, v in (
            ("rows in table", c.total),
            ("images asked for", c.images),
            ("done", c.done),
            ("of them filtered (data.min_clip_score)", c.filtered),
            ("rejected", c.rejected),
            ("failed", c.failed),
            ("skipped by resume", c.skipped),
            ("rows/s while generating", round(s.rows_per_second, 3)),
            ("rows/s in steady state (20-80%)", round(s.steady_rows_per_second, 3)),
            ("wall seconds", round(s.seconds, 1)),
        )
    ]
    if s.plan.get("images_per_second"):
        rows.append({"what": "images/s the plan estimated", "value": round(s.plan["images_per_second"], 3)})
        # this run's: its GPUs' seconds per image out in steady state, spread over the images it kept
        k, kept = s.plan.get("candidates_per_image") or 1, c.done - c.filtered
        steady = s.steady_rows_per_second
        per_kept = s.plan["gpus"] / steady * c.done / kept if kept and steady else None
        rows.append(
            {
                "what": f"GPU-s per kept image, {k} candidate{'s' if k > 1 else ''} an image (planned / this run)",
                "value": f"{s.plan['gpu_seconds_per_image']:.2f} / {'-' if per_kept is None else f'{per_kept:.2f}'}"
                + (f" ({s.plan['cost_vs_one_candidate']:.2f}x k = 1)" if k > 1 else ""),
            }
        )
    for stage, sec in s.stage_seconds_per_image.items():
        rows.append({"what": f"{stage} s/image", "value": f"{sec:.3f} ({100 * sec / total_stage:.0f}%)"})
    return rows


def plan_markdown(s: RunRecord) -> list[str]:
    """The plan the run used, and what it estimated beside what the run measured."""
    p = s.plan
    if not p.get("stages"):
        return [f"No plan ({md_escape(p.get('mode', 'none'))}): {md_escape(p.get('reason', '-'))}."]
    out = [
        f"{p['gpus']} x {md_escape(p['kind'])}, costs from {md_escape(p['costs_from'])}; "
        f"bottleneck: {md_escape(p['bottleneck'])}.",
    ]
    if len(p.get("groups") or []) > 1:
        split = ", ".join(f"{g['gpus']} x ({' + '.join(g['stages'])})" for g in p["groups"])
        out.append(f"The cascade does not fit one GPU: the GPUs are split {split}.")
    if p.get("calibration"):
        c = p["calibration"]
        out.append(
            f"Re-planned after the run's first {c['images']} images: the plan before it was costed from "
            f"{md_escape(c['estimated'].get('costs_from', '-'))}, estimating "
            f"{c['estimated'].get('images_per_second', 0):.3f} images/s."
        )
    out += [
        "",
        "| | estimated | measured |",
        "|---|---|---|",
        f"| images/s | {p['images_per_second']:.3f} | {s.steady_rows_per_second:.3f} in steady state, "
        f"{s.rows_per_second:.3f} over the run |",
    ]
    for stage, st in p["stages"].items():
        measured = s.stage_seconds_per_image.get(stage)
        out.append(
            f"| {stage}: {st['replicas']} x {st['num_gpus']:g} GPU, batch {st['batch_size']}, s/image "
            f"| {st['seconds_per_image']:.3f} | {'-' if measured is None else f'{measured:.3f} (in the actor)'} |"
        )
    return out


def summary_markdown(s: RunRecord, manifest_dir: str, sheet: str | None, sample: list[dict]) -> str:
    status = "all images done" if s.ok else f"**{s.counts.failed} failed, {s.counts.rejected} rejected**"
    preset, models, prompts = s.config.get("preset"), s.models, s.params.prompts
    lines = [
        f"# ifbatch run `{s.run_id}`",
        "",
        f"{status}: {s.counts_line}, in {s.seconds:.0f} s.",
        "",
        f"- prompts: {link(prompts)}",
        f"- output: {link(s.output)}",
        f"- manifest: {link(manifest_dir)}",
        f"- run record: {link(s.run_record)}",
        f"- contact sheet: {link(sheet)}",
        f"- rejected rows: {link(s.rejected_file)}",
        f"- preset: `{md_escape(preset)}`",
        "",
        "## Models",
        "",
        "| stage | source | commit | variant | dtype |",
        "|---|---|---|---|---|",
    ]
    for role, m in models.items():
        lines.append(
            f"| {role} | {md_escape(m['source'])} | {md_escape(m.get('commit') or '-')} | "
            f"{md_escape(m.get('variant') or '-')} | {m['dtype']} |"
        )
    lines += ["", "## Plan: estimated against measured", "", *plan_markdown(s)]
    if sample:
        lines += ["", "## First rows", "", "| id | prompt |", "|---|---|"]
        lines += [f"| {md_escape(r['id'])} | {md_escape(r['prompt'])} |" for r in sample]
    if s.errors:
        lines += ["", "## Failures (first ones)", ""] + [
            f"- `{md_escape(e['id'])}`: {md_escape(e['error'])}" for e in s.errors[:10]
        ]
    return "\n".join(lines) + "\n"
