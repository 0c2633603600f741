"""The last operators of the stream: encode each ok row's image and write it (a file, or a member of a WebDataset
shard), then return the rows' manifest records as an Arrow table (no pixels, no per-run facts: the driver adds
those once per manifest part)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ifbatch.configs.schema import STAGES, CascadeConfig
from ifbatch.models.text import preprocessing

from ..inputs.params import cell, param_fields
from ..storage import locate
from .credentials import Signer, reason
from .images import EXTENSIONS, encode_image, image_relpath
from .manifest import RECORD_SCHEMA
from .shards import SHARDS_DIR, Sample, build_shard, sample_key, shard_name, write_shard

STOPPED = "stopped: the run was stopped before this image was written"


@contextlib.contextmanager
def writing(ledger, items: list[tuple[str, str]]) -> Iterator[bool]:
    """In a writer: whether to write `items` (False once the run has stopped); the ledger (a Ray run's:
    stream/ray/ledger.py) is told when done. No ledger (the local executor, whose writes finish on the driver's own
    thread): always."""
    if ledger is None or not items:
        yield True
        return
    import ray

    seq = ray.get(ledger.begin.remote(items))
    if seq is None:
        yield False
        return
    try:
        yield True
    finally:
        ledger.end.remote(seq)


# Copied from the row as they are: what the row was, and what shaped its image
COPIED = [
    "id",
    "row",
    "prompt_id",
    "image_index",
    "prompt",
    "negative_prompt",
    "seed",
    "truncated",
    "negative_truncated",
    *[f.name for f in param_fields()],
    *[f"seconds_{stage}" for stage in STAGES],
]


def _flags(x: np.ndarray) -> pa.Array:
    """The stages' int8 flags (-1: not checked) as nullable booleans."""
    x = np.asarray(x, dtype=np.int8)
    return pa.array(x > 0, mask=x < 0)


def _placement(batch: dict[str, np.ndarray], n: int) -> list[str]:
    """Each stage's own JSON fragment, joined into one object per row without parsing any of them."""
    cols = [(stage, batch[f"placement_{stage}"]) for stage in STAGES if f"placement_{stage}" in batch]
    return ["{" + ", ".join(f'"{stage}": {col[i]}' for stage, col in cols) + "}" for i in range(n)]


def _flag(x) -> bool | None:
    return None if int(x) < 0 else bool(x > 0)


def provenance(batch: dict[str, np.ndarray], i: int, models: dict, text_preprocessing: str, run: dict) -> dict:
    """How row i's image was made, as stored in the file itself (outputs/images.py) and read back by anyone: with
    the checks' flags, its score and `run` (the run's k), every fact of its manifest record that
    is not of the file, so that a whole image whose record was lost (the run killed before its records were
    written) is taken over by the next run as it is (outputs/adopt.py). Of a best-of-k image also the chosen
    candidate, its stage I seed (which stages II and III ran with) and every candidate's score."""
    chosen = {}
    if "candidate" in batch:
        chosen = {
            "candidate": int(batch["candidate"][i]),
            "candidate_seed": int(batch["candidate_seed"][i]),
            "candidate_scores": [float(x) for x in np.asarray(batch["candidate_scores"][i]).reshape(-1)],
        }
    score = float(batch["clip_score"][i]) if "clip_score" in batch else math.nan
    return {
        **run,
        "row": int(batch["row"][i]),
        "truncated": bool(batch["truncated"][i]),
        "negative_truncated": bool(batch["negative_truncated"][i]),
        "nsfw": _flag(batch["nsfw"][i]),
        "watermark_detected": _flag(batch["watermark_detected"][i]),
        "watermarked": bool(batch["watermarked"][i]),
        "clip_score": None if math.isnan(score) else score,
        "id": str(batch["id"][i]),
        "prompt_id": str(batch["prompt_id"][i]),
        "image_index": int(batch["image_index"][i]),
        "prompt": str(batch["prompt"][i]),
        "negative_prompt": str(batch["negative_prompt"][i] or ""),
        "seed": int(batch["seed"][i]),
        "text_preprocessing": text_preprocessing,
        "params": {f.name: cell(batch[f.name][i]) for f in param_fields()},
        "models": models,
        **chosen,
    }


def _choices(batch: dict[str, np.ndarray], status: list[str]) -> dict[str, pa.Array]:
    """The best-of-k columns: the final image's clip_score; the chosen candidate, its seed and every candidate's
    64 px score. A run that did not choose made candidate 0 with the row's seed and scored no candidate; a failed
    row has none of them."""
    n = len(status)
    failed = np.array([s == "failed" for s in status])
    final = np.asarray(batch["clip_score"], np.float32) if "clip_score" in batch else np.full(n, np.nan, np.float32)
    if "candidate" in batch:
        index, seed = np.asarray(batch["candidate"], np.int16), np.asarray(batch["candidate_seed"], np.int64)
        scores = np.asarray(batch["candidate_scores"], np.float32).reshape(n, -1)
        listed = pa.array([None if f else list(r) for r, f in zip(scores, failed, strict=True)], pa.list_(pa.float32()))
    else:
        index, seed = np.zeros(n, np.int16), np.asarray(batch["seed"], np.int64)
        listed = pa.nulls(n, pa.list_(pa.float32()))
    return dict(
        clip_score=pa.array(final, mask=np.isnan(final) | np.array([s != "ok" for s in status])),  # of a made image
        candidate=pa.array(index, mask=failed),
        candidate_seed=pa.array(seed, mask=failed),
        candidate_scores=listed,
    )


class ImageWriter:
    """map_batches callable: encodes each ok row's image with its provenance. to_files: writes it as a file, durable
    before its record is returned (output.format files). Else hands the encoded bytes on (`payload`, `meta`) to the
    format's next writer (webdataset: ShardWriter), which records them once it has written them. fmt: the format
    each record names (default: output.format)."""

    def __init__(
        self,
        cfg: CascadeConfig,
        output: str,
        models: dict | None = None,
        run_id: str = "",
        ledger: Any = None,
        fmt: str | None = None,
        to_files: bool | None = None,
    ):
        self.out = cfg.output
        self.format = fmt or cfg.output.format
        self.files = self.format == "files" if to_files is None else to_files
        self.ledger = ledger if self.files else None  # (the next writer asks the ledger for what it writes)
        self.loc = locate(output, cfg.s3)
        self.models = models or {}
        # what shaped every image of the run, recorded with each (outputs/drift.py compares them on a resume)
        self.text_preprocessing = preprocessing(cfg.text_encoder.clean_caption)
        self.k, self.floor = cfg.data.candidates_per_image, cfg.data.min_clip_score
        # Not the run's id, nor its score floor (which decides whether an image is made, not how): the same rows,
        # seeds and settings give the same bytes, run after run
        self.run = {"candidates_per_image": self.k}
        c2pa = cfg.output.c2pa
        self.signer = None if c2pa.signing is None else Signer(c2pa.signing, self.models, c2pa.include_prompt)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        errors = batch.get("error", np.array([""] * n, dtype=object))
        filtered = batch.get("filtered", np.zeros(n, bool))
        status, error = ["ok"] * n, [None] * n
        uri, width, height, sha, size, seconds = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n, [0.0] * n
        signed: list[str | None] = [None] * n
        payload, meta = [None] * n, [None] * n
        paths = {
            i: self.loc.path(image_relpath(str(batch["id"][i]), self.out))
            for i in range(n)
            if self.files and not errors[i] and not filtered[i]
        }
        with writing(self.ledger, [(str(batch["id"][i]), p) for i, p in paths.items()]) as go:
            for i in range(n):
                t0 = time.perf_counter()
                if errors[i]:
                    status[i], error[i] = "failed", str(errors[i])
                    continue
                if filtered[i]:  # under data.min_clip_score: recorded, not made
                    status[i] = "filtered"
                    continue
                if not go:  # the run stopped: nothing is written after
                    status[i], error[i] = "failed", STOPPED
                    continue
                try:
                    pixels = batch["image"][i]
                    how = provenance(batch, i, self.models, self.text_preprocessing, self.run)
                    data = encode_image(pixels, self.out, how)
                    if self.signer is not None:
                        data = self.sign(data, how)
                        signed[i] = self.signer.signing.signer
                    if self.files:
                        self.loc.write_bytes(paths[i], data)
                        uri[i] = self.loc.uri(paths[i])
                    else:
                        payload[i], meta[i] = data, json.dumps(how, sort_keys=True, ensure_ascii=False)
                    sha[i], size[i] = hashlib.sha256(data).hexdigest(), len(data)
                    height[i], width[i] = int(pixels.shape[0]), int(pixels.shape[1])
                except Unsigned as e:
                    status[i], error[i] = "failed", str(e)[:2000]
                except Exception as e:
                    status[i], error[i] = "failed", f"write: {type(e).__name__}: {e}"[:2000]
                seconds[i] = time.perf_counter() - t0
        columns = {  # NaN: null; a stage the run did not have (the scorer) has no seconds
            c: pa.array(batch[c], RECORD_SCHEMA.field(c).type, from_pandas=True)
            if c in batch or not c.startswith("seconds_")
            else pa.nulls(n, pa.float64())
            for c in COPIED
        }
        columns |= dict(
            status=status,
            error=error,
            image_uri=uri,
            shard=pa.nulls(n, pa.string()),
            member=pa.nulls(n, pa.string()),
            offset=pa.nulls(n, pa.int64()),
            width=width,
            height=height,
            sha256=sha,
            bytes=pa.array(size, pa.int64()),
            c2pa_signer=pa.array(signed, pa.string()),
            nsfw=_flags(batch["nsfw"]),
            watermark_detected=_flags(batch["watermark_detected"]),
            watermarked=batch["watermarked"].astype(bool),
            **_choices(batch, status),
            format=[self.format] * n,
            text_preprocessing=[self.text_preprocessing] * n,
            candidates_per_image=pa.array([self.k] * n, pa.int16()),
            min_clip_score=pa.array([self.floor] * n, pa.float32()),
            seconds_write=seconds,
            placement=_placement(batch, n),
            written_at=[_now()] * n,
        )
        table = pa.table({c: columns[c] for c in RECORD_SCHEMA.names}, schema=RECORD_SCHEMA)
        if not self.files:
            table = table.append_column("payload", pa.array(payload, pa.binary()))
            table = table.append_column("meta", pa.array(meta, pa.string()))
        return table

    def sign(self, data: bytes, how: dict) -> bytes:
        """The encoded image with its content credentials; a signer that fails (a certificate that expired during
        the run, a key store that stopped answering) fails this image with the reason, and the others go on."""
        try:
            return self.signer.sign(data, self.out.image_format, how)
        except Exception as e:
            raise Unsigned(f"sign: {self.signer.signing.source}: {reason(e)}") from e


class Unsigned(Exception):
    """An image's content credentials could not be made: the image is not written."""


def _now() -> str:
    """When a record was written, to the microsecond: what orders an id's records (outputs/manifest.py)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class ShardWriter:
    """map_batches callable for output.format webdataset (a batch is output.shard_samples records from
    ImageWriter): writes the batch's images as one shard (several when output.shard_bytes cuts it), then returns
    every record with its shard, member and offset, the encoded bytes dropped. A shard that cannot be written
    leaves its images failed (the next run makes them again)."""

    HEADERS = 3 * 1536  # tar headers of a sample's three members, at most

    def __init__(self, cfg: CascadeConfig, output: str, run_id: str, ledger: Any = None):
        self.out = cfg.output
        self.ledger = ledger
        self.loc = locate(output, cfg.s3)
        self.run_id = run_id
        self.tag = uuid.uuid4().hex[:6]  # this actor's shards; a restarted actor gets another
        self.seq = 0
        self.ext = EXTENSIONS[cfg.output.image_format]

    def groups(self, ok: list[int], sizes: list[int]) -> list[list[int]]:
        """The ok rows cut into shards of at most shard_bytes (one sample at least)."""
        out: list[list[int]] = []
        used = 0
        for i in ok:
            size = sizes[i] + self.HEADERS
            if not out or (used + size > self.out.shard_bytes and out[-1]):
                out.append([])
                used = 0
            out[-1].append(i)
            used += size
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status, error = batch.column("status").to_pylist(), batch.column("error").to_pylist()
        payload, meta = batch.column("payload").to_pylist(), batch.column("meta").to_pylist()
        ids, prompts = batch.column("id").to_pylist(), batch.column("prompt").to_pylist()
        seconds = batch.column("seconds_write").to_pylist()
        shard, member, offset = [None] * n, [None] * n, [None] * n
        ok = [i for i in range(n) if status[i] == "ok"]
        sizes = [len(p or b"") + len(m or "") for p, m in zip(payload, meta, strict=True)]
        for g, rows in enumerate(self.groups(ok, sizes)):
            t0 = time.perf_counter()
            name = shard_name(self.run_id, self.tag, self.seq)
            self.seq += 1
            try:
                samples = [Sample(sample_key(ids[i]), self.ext, payload[i], meta[i], prompts[i]) for i in rows]
                data, members = build_shard(samples)
                stats = dict(
                    shard=name,
                    run_id=self.run_id,
                    samples=len(rows),
                    ok=len(rows),
                    failed=status.count("failed") if g == 0 else 0,  # the batch's failed rows, beside its first shard
                    bytes=len(data),
                    seconds=round(time.perf_counter() - t0, 6),
                    written_at=_now(),
                )
                with writing(self.ledger, [(ids[i], self.loc.path(SHARDS_DIR, name)) for i in rows]) as go:
                    if not go:  # the run stopped: nothing is written after
                        raise Stopped(STOPPED)
                    where = self.loc.uri(write_shard(self.loc, name, data, stats))
                for i, m in zip(rows, members, strict=True):
                    shard[i], member[i], offset[i] = where, m.name, m.offset
            except Stopped:
                for i in rows:
                    status[i], error[i] = "failed", STOPPED
            except Exception as e:
                for i in rows:
                    status[i], error[i] = "failed", f"write: shard {name}: {type(e).__name__}: {e}"[:2000]
            share = (time.perf_counter() - t0) / len(rows)
            for i in rows:
                seconds[i] += share
        done = dict(
            status=pa.array(status, pa.string()),
            error=pa.array(error, pa.string()),
            shard=pa.array(shard, pa.string()),
            member=pa.array(member, pa.string()),
            offset=pa.array(offset, pa.int64()),
            seconds_write=pa.array(seconds, pa.float64()),
            written_at=pa.array([_now()] * n, pa.string()),  # recorded after its shard: the record's time
        )
        cols = [done[c] if c in done else batch.column(c) for c in RECORD_SCHEMA.names]
        return pa.Table.from_arrays(cols, schema=RECORD_SCHEMA)


class Stopped(Exception):
    """The run stopped before a shard was written."""


@dataclass(frozen=True)
class WriterStep:
    """One writer operator of the stream, as every executor runs it: the callable class and its constructor
    arguments, the batch it takes (rows, numpy or pyarrow), its pool's share of output.writers, CPUs per actor and
    calls an actor takes at once."""

    cls: type
    kwargs: dict[str, Any]
    batch_size: int
    batch_format: str
    share: float
    num_cpus: float
    calls: int = 1
