"""Several images per prompt: each image's id and seed, the work table's per-row image lists, and the expansion
of an encoded batch (one row per prompt) into one row per image.

Image k of a row: id `<row id>` for k = 0 and `<row id>~<k>` after (`~` is not allowed in row ids, so image ids
never collide with them); seed the row's own for k = 0 and derived from it and k after. A row with one image is
therefore exactly what it was before images per prompt existed, and raising n later keeps the images made.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.models.seeding import derive_seed

SEP = "~"


def image_id(row_id: str, k: int) -> str:
    return row_id if k == 0 else f"{row_id}{SEP}{k}"


def image_seed(seed: int, k: int) -> int:
    return int(seed) if k == 0 else derive_seed(int(seed), f"image {k}")


def image_lists(n: np.ndarray) -> pa.Array:
    """list<int32> per row: 0 .. n-1 (the images still to make; resume removes the done ones)."""
    n = np.asarray(n, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)])
    values = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], n)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


def image_count(rows: pa.Table) -> int:
    """Images the work table asks for."""
    if rows.num_rows == 0:
        return 0
    return int(pc.sum(pc.list_value_length(rows.column("images"))).as_py() or 0)


def images_of(rows: pa.Table) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Every image the work table asks for: the row it belongs to (its position), its index k in that row, its id."""
    images = rows.column("images").combine_chunks()
    counts = pc.list_value_length(images).to_numpy(zero_copy_only=False)
    ks = pc.list_flatten(images).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(rows.num_rows), counts)
    ids = pc.take(rows.column("id"), pa.array(owner))
    k = pa.array(ks)
    suffix = pc.if_else(pc.equal(k, 0), "", pc.binary_join_element_wise(SEP, pc.cast(k, pa.string()), ""))
    return owner, ks, pc.binary_join_element_wise(ids, suffix, "")  # image_id(), vectorised


def without_done(rows: pa.Table, done: pa.Array) -> pa.Table:
    """The work table less the images whose id is in `done`; rows left with no image are dropped."""
    owner, ks, image_ids = images_of(rows)
    keep = ~pc.is_in(image_ids, value_set=done).to_numpy(zero_copy_only=False)
    left = np.bincount(owner[keep], minlength=rows.num_rows)
    offsets = np.concatenate([[0], np.cumsum(left)])
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ks[keep], pa.int32()))
    rows = rows.set_column(rows.schema.get_field_index("images"), "images", lists)
    return rows.filter(pa.array(left > 0))


def expand(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per image to make: columns repeated, then id, seed, prompt_id and image_index set per image."""
    lists = [np.asarray(x, dtype=np.int64).reshape(-1) for x in batch["images"]]
    counts = np.array([len(x) for x in lists], dtype=np.int64)
    take = np.repeat(np.arange(len(lists)), counts)
    ks = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    out = {key: col[take] for key, col in batch.items() if key != "images"}
    row_ids = out["id"]
    out["prompt_id"] = row_ids.copy()
    out["image_index"] = ks.astype(np.int32)
    out["id"] = np.array([image_id(str(r), int(k)) for r, k in zip(row_ids, ks, strict=True)], dtype=object)
    out["seed"] = np.array([image_seed(s, int(k)) for s, k in zip(out["seed"], ks, strict=True)], dtype=np.int64)
    return out
