"""Whether the images an output already holds were made with this run's settings.

Resume skips an image whose id has a done record. Ids say which row and image, not how it was made: a rerun with
other steps, guidance, noise levels, seeds, text preprocessing, models, best of k, score floor or watermark would
otherwise keep the old images beside new ones made otherwise, in one dataset, and say only how many it skipped.
This module finds, for the images of this run that are already done, every setting whose recorded value is not
what this run would use, and for how many images (the run refuses, or remakes them: data.on_changed_settings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs.schema import CascadeConfig
from ifbatch.models.text import preprocess, preprocessing

from ..inputs.expand import image_seed, images_of
from ..inputs.params import param_fields
from .manifest import done_records

# Per image, recorded in the manifest and worked out for this run's images alike.
PER_IMAGE = ("prompt", "negative_prompt", "seed", *[f.name for f in param_fields()])
# Per run, the same for every image of it.
PER_RUN = ("text_preprocessing", "watermarked", "candidates_per_image", "min_clip_score")  # a floor: _floor_changes
MODEL_FIELDS = ("source", "revision", "variant", "dtype")  # what a config asks of a model (the commit is resolved)
READ = ["id", "status", *PER_IMAGE, *PER_RUN, "candidate_scores", "models"]


class SettingsChanged(ValueError):
    """Done images of this run's rows were made with other settings, and data.on_changed_settings is refuse."""


@dataclass(frozen=True)
class Change:
    """One setting whose recorded value differs from this run's, and for how many of the done images."""

    setting: str
    before: Any
    now: Any
    images: int

    def text(self) -> str:
        return f"{self.setting} {self.before!r} (this run: {self.now!r}) for {images(self.images)}"


def images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


@dataclass(frozen=True)
class Drift:
    changes: list[Change]
    ids: pa.Array  # the done images of this run made with other settings
    done: pa.Array  # every done id among `compare`'s records (drift's: among this run's images)
    compared: pa.Array  # the done images that are this run's

    def summary(self) -> str:
        return "; ".join(c.text() for c in self.changes)

    def record(self) -> dict:
        """For the run record."""
        return {"images": len(self.ids), "changes": [c.__dict__ for c in self.changes]}

    def refusal(self, output: str, remake_possible: bool) -> SettingsChanged:
        remake = (
            ", or add --set data.on_changed_settings=remake to make them again with this run's settings (their "
            "files are replaced)"
            if remake_possible
            else " (remaking them in place is for output.format=files: a WebDataset shard cannot drop a sample)"
        )
        return SettingsChanged(
            f"{images(len(self.ids))} in {output} that this run would skip as done were made with other settings: "
            f"{self.summary()}. Resuming would mix them with images made with this run's settings. Rerun with the "
            f"settings they were made with, or write to another output{remake}"
        )


def made_with(loc, cfg: CascadeConfig, ids: Iterable[str] | None = None) -> pa.Table:
    """The latest record of every done image (of `ids` only, when given), with what it was made with (`filled`)."""
    return filled(done_records(loc, READ, ids), cfg)


def filled(t: pa.Table, cfg: CascadeConfig) -> pa.Table:
    """Records (columns READ) with what older ones left null worked out where it can be: their k from their
    candidate scores (none: one candidate); a null text preprocessing (ifbatch before it said so fed T5 the prompt
    as given) is this run's when that preprocessing leaves both texts as they are, else "as given"."""
    t = t.select(READ)
    scores = t.column("candidate_scores")
    scored = pc.list_value_length(scores).cast(pa.int16())
    t = _replaced(
        t, "candidates_per_image", pc.coalesce(t.column("candidates_per_image"), scored, pa.scalar(1, pa.int16()))
    )
    floors = cfg.data.min_clip_score is not None or t.column("min_clip_score").null_count < t.num_rows
    best = [max(s) if s else None for s in scores.to_pylist()] if floors else [None] * t.num_rows
    t = t.append_column("best_score", pa.array(best, pa.float64())).drop_columns(["candidate_scores"])  # for a floor
    how = t.column("text_preprocessing")
    if how.null_count:
        clean = cfg.text_encoder.clean_caption
        prompts = [p or "" for p in t.column("prompt").to_pylist()]
        negatives = [n or "" for n in t.column("negative_prompt").to_pylist()]
        same = [
            p == q and n == m
            for p, q, n, m in zip(
                prompts, preprocess(prompts, clean), negatives, preprocess(negatives, clean), strict=True
            )
        ]
        filled = pc.if_else(
            pc.and_(pc.is_null(how), pa.array(same)),
            pa.scalar(preprocessing(clean)),
            pc.coalesce(how, pa.scalar("as given")),
        )
        t = _replaced(t, "text_preprocessing", filled)
    return t


def _replaced(t: pa.Table, name: str, column) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, column)


def this_runs_images(rows: pa.Table) -> pa.Table:
    """One row per image the work table asks for: its id and the per-image settings it would be made with."""
    owner, ks, ids = images_of(rows)
    at = pa.array(owner)
    seeds = pc.take(rows.column("seed"), at).to_pylist()
    columns = {"id": ids, "seed": pa.array([image_seed(s, int(k)) for s, k in zip(seeds, ks, strict=True)], pa.int64())}
    for name in PER_IMAGE:
        if name not in columns:
            columns[name] = pc.take(rows.column(name), at)
    return pa.table(columns)


def _models_asked(cfg: CascadeConfig) -> dict[str, dict]:
    out = {s: getattr(cfg, s) for s in ("text_encoder", "stage_1", "stage_2", "stage_3")}
    asked = {name: {f: getattr(section, f) for f in MODEL_FIELDS} for name, section in out.items()}
    if cfg.safety.watermark:  # IF's watermark is in the final pixels
        asked["safety"] = {"source": cfg.safety_source, "revision": cfg.safety.revision}
    if cfg.data.candidates_per_image > 1:  # the scorer chose the image
        asked["scorer"] = {f: getattr(cfg.scorer, f) for f in MODEL_FIELDS}
    return asked


def _model_changes(done: pa.Table, cfg: CascadeConfig) -> tuple[list[Change], np.ndarray]:
    asked = _models_asked(cfg)
    models = done.column("models").to_pylist()
    changed = np.zeros(len(models), bool)
    counts: dict[tuple[str, str], list] = {}
    for text in set(models):
        if not text:
            continue  # a record from before models were recorded: nothing to compare
        made = json.loads(text)
        rows = np.array([m == text for m in models])
        for name, want in asked.items():
            had = made.get(name)
            if had is None:
                continue  # that model did not make these images (the scorer of a k = 1 run, a watermark off)
            for f, value in want.items():
                if had.get(f) != value:
                    key = (f"{name}.{f}", json.dumps([had.get(f), value]))
                    counts.setdefault(key, [had.get(f), value, 0])[2] += int(rows.sum())
                    changed |= rows
    return [Change(s, b, n, c) for (s, _), (b, n, c) in sorted(counts.items())], changed


def drift(loc, rows: pa.Table, cfg: CascadeConfig) -> Drift:
    """What differs between the done images of this run's rows and what this run would make of them. Only the
    records of this run's images are kept as the manifest is read (its `done`: those of them that are done), so
    what a run holds and compares follows its table, not the output."""
    mine = this_runs_images(rows)
    return compare(made_with(loc, cfg, mine.column("id").to_pylist()), rows, cfg, mine)


def compare(done: pa.Table, rows: pa.Table, cfg: CascadeConfig, mine: pa.Table | None = None) -> Drift:
    """What differs between records (`filled`) of images of this run's rows and what this run would make of
    them: the done images of an output, or those a run killed before recording them left whole (outputs/adopt.py).
    mine: this_runs_images(rows), when the caller has it already."""
    ids = done.column("id").combine_chunks()
    mine = this_runs_images(rows) if mine is None else mine
    mine = mine.rename_columns([c if c == "id" else f"now_{c}" for c in mine.column_names])
    both = done.filter(pc.is_in(done.column("id"), mine.column("id"))).join(mine, "id")
    n = both.num_rows
    now = {
        "text_preprocessing": preprocessing(cfg.text_encoder.clean_caption),
        "watermarked": cfg.safety.watermark,
        "candidates_per_image": cfg.data.candidates_per_image,
    }
    changes: list[Change] = []
    changed = np.zeros(n, bool)
    pairs = [(name, both.column(name), both.column(f"now_{name}")) for name in PER_IMAGE]
    pairs += [(name, both.column(name), pa.array([v] * n, both.column(name).type)) for name, v in now.items()]
    made = pc.equal(both.column("status"), "ok")
    for name, before, after in pairs:
        differs = pc.fill_null(pc.not_equal(before, after), True)  # a null on one side only differs
        differs = pc.and_(differs, pc.invert(pc.and_(pc.is_null(before), pc.is_null(after))))
        if name == "watermarked":  # of a made image only (a filtered one has none)
            differs = pc.and_(differs, made)
        mask = differs.to_numpy(zero_copy_only=False)
        if not mask.any():
            continue
        changed |= mask
        t = pa.table({"before": before, "now": after}).filter(differs)
        for g in t.group_by(["before", "now"]).aggregate([([], "count_all")]).to_pylist():
            changes.append(Change(_setting(name), g["before"], g["now"], g["count_all"]))
    for found, mask in (_model_changes(both, cfg), _floor_changes(both, cfg)):
        changes += found
        changed |= mask
    changed_ids = pc.filter(both.column("id"), pa.array(changed, pa.bool_())).combine_chunks()
    return Drift(changes, changed_ids, ids, both.column("id").combine_chunks())


def _floor_changes(both: pa.Table, cfg: CascadeConfig) -> tuple[list[Change], np.ndarray]:
    """Images this run's score floor would decide otherwise: recorded filtered, now above it (or no floor); recorded
    ok, now under it. A floor decides whether an image is made, not how, so the floors alone are not compared."""
    recorded = both.column("min_clip_score")
    now = cfg.data.min_clip_score
    if now is None and recorded.null_count == len(recorded):
        return [], np.zeros(len(recorded), bool)
    floors = recorded.to_pylist()
    best = both.column("best_score").to_pylist()
    status = both.column("status").to_pylist()
    made_now = [b is not None and (now is None or b >= now) for b in best]
    mask = np.array(
        [
            (s == "filtered" and m) or (s == "ok" and not m and b is not None)
            for s, m, b in zip(status, made_now, best, strict=True)
        ],
        bool,
    )
    groups: dict[Any, int] = {}
    for x in np.asarray(floors, dtype=object)[mask]:
        groups[x] = groups.get(x, 0) + 1
    return [Change("data.min_clip_score", x, now, c) for x, c in groups.items()], mask


def _setting(column: str) -> str:
    """The name a user knows a compared column by."""
    if column.startswith("stage_"):
        stage, _, name = column.partition("_")[2].partition("_")
        return f"stage_{stage}.{name} (column {column})"
    return {
        "text_preprocessing": "text_encoder.clean_caption (text_preprocessing)",
        "watermarked": "safety.watermark",
        "candidates_per_image": "data.candidates_per_image",
    }.get(column, column)
