"""Read prompt tables (a Parquet file, a folder of parts, or s3://), check them, give every row an id and a seed.

Table-level problems raise `PromptTableError` before any model loads. Row-level problems reject that row with
a reason; the other rows go on.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ifbatch.configs.schema import MAX_IMAGES_PER_PROMPT, CascadeConfig
from ifbatch.models.seeding import SEED_MAX, derive_seed

from ..storage import locate
from .expand import image_lists
from .params import OVERRIDES, param_fields, resolve_params

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?$", re.I)  # device names on Windows
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls and DEL, but tab, LF, CR
ROW_FIELDS = [
    pa.field("row", pa.int64()),
    pa.field("id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
]
# The work order: one record per valid row, with every stage parameter already resolved, and the indices of
# the images still to make from it (expand.py)
WORK_SCHEMA = pa.schema(ROW_FIELDS + param_fields() + [pa.field("images", pa.list_(pa.int32()))])


class PromptTableError(ValueError):
    """The table as a whole cannot be used (unreadable, no prompt column, wrong column types)."""


@dataclass
class Rejected:
    row: int
    id: str | None
    prompt: str | None
    reason: str


@dataclass
class PromptPlan:
    source: str
    rows: pa.Table  # WORK_SCHEMA: the valid rows
    rejected: list[Rejected] = field(default_factory=list)
    total: int = 0


def default_id(prompt: str, negative: str, occurrence: int) -> str:
    """Stable across runs for the same table: prompt, negative prompt and how often the pair came before."""
    key = f"{prompt}\x00{negative}\x00{occurrence}".encode()
    return "p" + hashlib.blake2b(key, digest_size=10).hexdigest()


def _dataset(uri: str, cfg: CascadeConfig) -> pads.Dataset:
    loc = locate(uri, cfg.s3)
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
    if not loc.fs.exists(loc.root):  # a store that cannot be reached or refuses raises its own error here
        raise PromptTableError(f"prompt table {uri!r} does not exist")
    try:
        ds = pads.dataset(loc.root, format="parquet", filesystem=fs, exclude_invalid_files=False)
    except Exception as e:  # pyarrow/fsspec raise many kinds; all mean "cannot read this table"
        raise PromptTableError(f"cannot read prompt table {uri!r} as Parquet: {type(e).__name__}: {e}") from None
    if not ds.files:
        raise PromptTableError(f"prompt table {uri!r}: no Parquet files in {uri!r}; expected a .parquet file or parts")
    return ds


def _check_parts(uri: str, ds: pads.Dataset, cols: dict[str, str], cfg: CascadeConfig) -> None:
    """Every part of a folder has the columns the table is read with, of the expected types, and no column of
    ours the first part lacks: a dataset takes the first part's schema, and would otherwise cast a disagreeing
    part's columns or drop them without a word."""
    if len(ds.files) < 2:
        return
    names = set(ds.schema.names)
    for frag in ds.get_fragments():
        part = f"{uri!r}, part {frag.path!r}"
        try:
            schema = frag.physical_schema
        except Exception as e:
            raise PromptTableError(f"prompt table {part}: cannot read it as Parquet: {type(e).__name__}: {e}") from None
        mine = _check_columns(f"{uri!r}, part {frag.path!r}", schema, cfg, quoted=True)
        for theirs in cols.values():
            if theirs not in schema.names:
                raise PromptTableError(
                    f"prompt table {part} has no column {theirs!r}, which the other parts have; every part needs "
                    f"the same columns"
                )
        extra = sorted(set(mine.values()) - set(cols.values()) - names)
        if extra:
            raise PromptTableError(
                f"prompt table {part} has column(s) {extra} that the first part lacks, so they would be dropped; "
                f"every part needs the same columns"
            )
        for theirs in cols.values():
            first, here = _base_type(ds.schema.field(theirs).type), _base_type(schema.field(theirs).type)
            if _kind(first) != _kind(here) and not pa.types.is_null(here) and not pa.types.is_null(first):
                raise PromptTableError(
                    f"prompt table {part}: column {theirs!r} has type {here}, but the first part's is {first}; "
                    f"every part needs the same types"
                )


def _base_type(typ: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column's value type (pandas `category`, many ETL tools); the type itself otherwise."""
    return typ.value_type if pa.types.is_dictionary(typ) else typ


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)


def _kind(typ: pa.DataType) -> str:
    if _is_text(typ):
        return "string"
    if pa.types.is_integer(typ):
        return "integer"
    if pa.types.is_floating(typ):
        return "float"
    return str(typ)


def _check_columns(uri: str, schema: pa.Schema, cfg: CascadeConfig, quoted: bool = False) -> dict[str, str]:
    """Map our names to the table's columns, checking types. Returns {our_name: table_column}."""
    d = cfg.data
    names = set(schema.names)
    uri = uri if quoted else repr(uri)
    if d.prompt_column not in names:
        raise PromptTableError(
            f"prompt table {uri} has no column {d.prompt_column!r} (the prompt column); it has "
            f"{sorted(names)}. Name the prompt column with --prompt-column or "
            f"data.prompt_column"
        )
    cols = {"prompt": d.prompt_column}
    optional = (
        ("id", d.id_column),
        ("negative_prompt", d.negative_prompt_column),
        ("seed", d.seed_column),
        ("n", d.images_column),
    )
    for ours, theirs in optional:
        if theirs in names:
            cols[ours] = theirs
    present_overrides = [c for c in OVERRIDES if c in names]
    if present_overrides and not d.row_overrides:
        raise PromptTableError(
            f"prompt table {uri} has per-row override columns {present_overrides}, but data.row_overrides is false"
        )
    cols.update({c: c for c in present_overrides})
    expect = {
        "prompt": _is_text,
        "negative_prompt": _is_text,
        "id": lambda t: _is_text(t) or pa.types.is_integer(t),
        "seed": pa.types.is_integer,
        "n": pa.types.is_integer,
    }
    words = {
        "prompt": "string",
        "negative_prompt": "string",
        "id": "string or integer",
        "seed": "integer",
        "n": "integer (images per prompt)",
    }
    for ours, theirs in cols.items():
        typ = schema.field(theirs).type
        ok = expect.get(ours, lambda t: pa.types.is_integer(t) or pa.types.is_floating(t))
        if not ok(_base_type(typ)) and not pa.types.is_null(typ):
            raise PromptTableError(
                f"prompt table {uri}: column {theirs!r} has type {typ}, expected {words.get(ours, 'a number')}"
            )
    return cols


def _override_problem(cfg: CascadeConfig, column: str, value: Any) -> str | None:
    stage, name = OVERRIDES[column]
    section = getattr(cfg, stage)
    info = type(section).model_fields[name]
    lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
    hi = next((m.le for m in info.metadata if hasattr(m, "le")), None)
    if not math.isfinite(value):
        return f"{column} = {value!r} is not a finite number; expected a number in [{lo}, {hi}] or null (the default)"
    if name == "steps" and value != int(value):
        return f"{column} = {value!r} is not a whole number"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"{column} = {value!r} is outside [{lo}, {hi}]"
    return None


def open_table(uri: str, cfg: CascadeConfig) -> tuple[pads.Dataset, dict[str, str]]:
    """The table as a dataset, its columns checked (every part's, for a folder), no row read yet; and
    {our name: the table's column}."""
    ds = _dataset(uri, cfg)
    cols = _check_columns(uri, ds.schema, cfg)
    _check_parts(uri, ds, cols, cfg)
    try:
        rows = ds.count_rows()  # from the parts' footers
    except (OSError, pa.ArrowException) as e:
        raise PromptTableError(f"cannot read prompt table {uri!r}: {type(e).__name__}: {e}") from None
    if rows == 0:
        raise PromptTableError(f"prompt table {uri!r} has 0 rows; nothing to generate")
    return ds, cols


def read_prompts(uri: str, cfg: CascadeConfig) -> PromptPlan:
    """Stream the table in batches of data.read_batch_rows; validate; assign ids and seeds."""
    ds, cols = open_table(uri, cfg)
    out: dict[str, list] = {f.name: [] for f in ROW_FIELDS} | {c: [] for c in OVERRIDES} | {"n": []}
    rejected: list[Rejected] = []
    seen: dict[str, int] = {}
    seen_folded: dict[str, tuple[int, str]] = {}
    occurrences: Counter = Counter()
    row = 0
    try:
        batches = ds.to_batches(columns=list(cols.values()), batch_size=cfg.data.read_batch_rows)
        for batch in batches:
            data = {ours: batch.column(theirs).to_pylist() for ours, theirs in cols.items()}
            for i in range(batch.num_rows):
                rec = {k: v[i] for k, v in data.items()}
                _take(rec, row, cfg, out, rejected, seen, occurrences, seen_folded)
                row += 1
    except PromptTableError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise PromptTableError(f"cannot read prompt table {uri!r}: {type(e).__name__}: {e}") from None
    n = len(out["id"])
    given = {c: pa.array(out[c], pa.float64()) for c in OVERRIDES if c in cols}
    columns = {f.name: pa.array(out[f.name], f.type) for f in ROW_FIELDS} | resolve_params(given, n, cfg)
    columns["images"] = image_lists(np.array(out["n"], dtype=np.int64))
    return PromptPlan(uri, pa.table(columns, schema=WORK_SCHEMA), rejected, row)


def _take(
    rec: dict,
    row: int,
    cfg: CascadeConfig,
    out: dict,
    rejected: list,
    seen: dict,
    occurrences: Counter,
    seen_folded: dict,
):
    prompt, raw_id = rec.get("prompt"), rec.get("id")
    negative = rec.get("negative_prompt") or ""
    rid = None if raw_id is None else str(raw_id)

    def reject(reason: str) -> None:
        rejected.append(Rejected(row, rid, prompt, reason))

    if prompt is None or not prompt.strip():
        return reject(f"row {row}: prompt is {'null' if prompt is None else 'empty'}; a non-empty string is expected")
    if len(prompt) > cfg.data.max_prompt_chars:
        return reject(
            f"row {row}: prompt is {len(prompt):,} characters; at most data.max_prompt_chars = "
            f"{cfg.data.max_prompt_chars:,} are accepted"
        )
    for text, what in ((prompt, "prompt"), (negative, "negative_prompt")):
        bad = CONTROL.search(text)
        if bad:
            return reject(
                f"row {row}: {what} holds the control character {bad.group()!r} at position {bad.start()}; "
                f"expected text (tabs and line breaks are fine)"
            )
    if rid is None:
        rid = default_id(prompt, negative, occurrences[(prompt, negative)])
        occurrences[(prompt, negative)] += 1
    elif not SAFE_ID.match(rid):
        return reject(
            f"row {row}: id {rid!r} is not a safe file name; expected 1-128 characters of letters, digits, "
            f"'.', '_' or '-', starting with a letter or digit"
        )
    elif RESERVED.match(rid):
        return reject(f"row {row}: id {rid!r} is a reserved device name on Windows; expected another id")
    if rid in seen:
        return reject(f"row {row}: duplicate id {rid!r} (first used by row {seen[rid]})")
    folded = rid.casefold()
    if folded in seen_folded:
        return reject(
            f"row {row}: id {rid!r} differs only in case from row {seen_folded[folded][0]}'s "
            f"{seen_folded[folded][1]!r}; their files would collide on a case-insensitive filesystem"
        )
    seed = rec.get("seed")
    if seed is None:
        seed = derive_seed(cfg.seed, rid)
    elif not 0 <= seed <= SEED_MAX:
        return reject(f"row {row}: seed {seed!r} is outside [0, 2**63 - 1]")
    images = rec.get("n")
    if images is None:
        images = cfg.data.images_per_prompt
    elif not 1 <= images <= MAX_IMAGES_PER_PROMPT:
        return reject(
            f"row {row}: {cfg.data.images_column} = {images!r} images per prompt is outside "
            f"[1, {MAX_IMAGES_PER_PROMPT}]"
        )
    overrides = {}
    for column in OVERRIDES:
        value = rec.get(column)
        if value is not None:
            problem = _override_problem(cfg, column, value)
            if problem:
                return reject(f"row {row}: {problem}")
            value = int(value) if column.endswith("steps") else float(value)
        overrides[column] = value
    seen[rid] = row
    seen_folded[folded] = (row, rid)
    for k, v in dict(
        row=row, id=rid, prompt=prompt, negative_prompt=negative, seed=seed, n=images, **overrides
    ).items():
        out[k].append(v)
