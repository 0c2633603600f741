"""Read prompt tables (a Parquet file, a folder of parts, or s3://), check them, give every row an id and a seed.

Table-level problems raise `PromptTableError` before any model loads. Row-level problems reject that row with
a reason; the other rows go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ifbatch.configs.schema import CascadeConfig

from ..storage import locate
from .expand import image_lists
from .params import OVERRIDES, param_fields, resolve_params
from .validate import Rejected, Validator, default_id  # noqa: F401 (default_id: what a row without an id gets)

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
class PromptPlan:
    source: str
    rows: pa.Table  # WORK_SCHEMA: the valid rows
    rejected: list[Rejected] = field(default_factory=list)
    total: int = 0


# Table formats whose folders hold Parquet parts that are not all the table: deleted and overwritten rows stay in
# old parts until vacuumed. Read as plain Parquet they come back (and their ids then collide).
TABLE_FORMATS = {"_delta_log": "a Delta Lake table", ".hoodie": "an Apache Hudi table", "metadata": "an Iceberg table"}


def _table_format(loc) -> str | None:
    """What kind of table a prompts folder is, when it is one of TABLE_FORMATS."""
    for marker, kind in TABLE_FORMATS.items():
        path = loc.path(marker)
        if marker == "metadata":  # Iceberg: metadata/*.metadata.json beside data/
            if loc.fs.glob(f"{path}/*.metadata.json"):
                return f"{kind} (it has metadata/*.metadata.json)"
        elif loc.fs.isdir(path):
            return f"{kind} (it has {marker}/)"
    return None


def _dataset(uri: str, cfg: CascadeConfig) -> pads.Dataset:
    loc = locate(uri, cfg.s3)
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
    source: str | list[str] = loc.root
    if any(c in loc.root for c in "*?["):  # a glob, quoted so the shell left it: expanded here
        source = sorted(loc.fs.glob(loc.root))
        if not source:
            raise PromptTableError(f"prompt table {uri!r}: the pattern matches no file")
    elif not loc.fs.exists(loc.root):  # a store that cannot be reached or refuses raises its own error here
        raise PromptTableError(f"prompt table {uri!r} does not exist")
    elif loc.fs.isdir(loc.root) and (kind := _table_format(loc)):
        raise PromptTableError(
            f"prompt table {uri!r} is {kind}: its Parquet files also hold rows it has deleted or overwritten, so "
            f"ifbatch does not read them as plain Parquet. Write the table's current rows to Parquet first (for "
            f"Delta Lake: deltalake.DeltaTable(path).to_pyarrow_table(), then pyarrow.parquet.write_table)"
        )
    try:
        # partitioning="hive": a folder like seed=5/part-0.parquet gives its rows the column seed = 5
        ds = pads.dataset(source, format="parquet", filesystem=fs, exclude_invalid_files=False, partitioning="hive")
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
    keys = set(ds.partitioning.schema.names) if getattr(ds, "partitioning", None) else set()  # from folder names
    for frag in ds.get_fragments():
        part = f"{uri!r}, part {frag.path!r}"
        try:
            schema = frag.physical_schema
        except Exception as e:
            raise PromptTableError(f"prompt table {part}: cannot read it as Parquet: {type(e).__name__}: {e}") from None
        mine = _check_columns(f"{uri!r}, part {frag.path!r}", schema, cfg, quoted=True)
        for theirs in cols.values():
            if theirs not in schema.names and theirs not in keys:
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
        for theirs in (c for c in cols.values() if c not in keys):
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
    """Stream the table in batches of data.read_batch_rows; validate each (validate.py, vectorized); assign ids
    and seeds; the work order of the accepted rows."""
    ds, cols = open_table(uri, cfg)
    check = Validator(cfg)
    try:
        # one batch at a time (pyarrow's read-ahead would hold a million rows in memory before they are needed)
        batches = ds.to_batches(
            columns=list(cols.values()), batch_size=cfg.data.read_batch_rows, batch_readahead=1, fragment_readahead=1
        )
        for batch in batches:
            check.add({ours: batch.column(theirs) for ours, theirs in cols.items()})
    except (OSError, pa.ArrowException) as e:
        raise PromptTableError(f"cannot read prompt table {uri!r}: {type(e).__name__}: {e}") from None
    rows, rejected = check.finish()
    n = rows.num_rows
    given = {c: rows.column(c).combine_chunks() for c in OVERRIDES if c in cols}
    columns = {f.name: rows.column(f.name).cast(f.type) for f in ROW_FIELDS} | resolve_params(given, n, cfg)
    columns["images"] = image_lists(rows.column("n").to_numpy())
    return PromptPlan(uri, pa.table(columns, schema=WORK_SCHEMA), rejected, check.rows)
