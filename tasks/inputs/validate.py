"""Row validation, vectorized and streaming: each batch of the table is checked with pyarrow compute (a Python loop
only makes the ids and seeds a row lacks, and the reasons of the rows it rejects), and the driver keeps only
compact Arrow columns of the rows that may be accepted. Duplicate and case-colliding ids are found once at the
end, over the whole table.

The rule (the order decides which reason a row gets): prompt null or blank; longer than data.max_prompt_chars;
control characters in the prompt or negative prompt; the id unsafe or a Windows device name (a row without an id
gets a stable hash of its prompt, negative prompt and how often the pair came before); the id used by an earlier
accepted row; the id equal to an earlier accepted row's but for case; the seed outside [0, 2**63 - 1]; n outside
[1, MAX_IMAGES_PER_PROMPT]; an override column NaN, infinite, not whole (steps) or out of range.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs.schema import MAX_IMAGES_PER_PROMPT, CascadeConfig
from ifbatch.models.params import PARAM_TYPES
from ifbatch.models.seeding import SEED_MAX, derive_seed

from .params import OVERRIDES

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?$", re.I)  # device names on Windows
CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"  # C0 controls, DEL and C1 controls, but tab, LF, CR
INVISIBLE = "[\u200b\u200c\u200d\u2060\ufeff\u00ad]"  # zero-width spaces and joiners, BOM, soft hyphen
CONTROL_RE = re.compile(CONTROL)
KEEP = ["row", "id", "prompt", "negative_prompt", "seed", "n", *OVERRIDES]  # what an accepted row carries


@dataclass
class Rejected:
    row: int
    id: str | None
    prompt: str | None
    reason: str


def default_id(prompt: str, negative: str, occurrence: int) -> str:
    """Stable across runs for the same table: prompt, negative prompt and how often the pair came before."""
    key = f"{prompt}\x00{negative}\x00{occurrence}".encode()
    return "p" + hashlib.blake2b(key, digest_size=10).hexdigest()


def _text(col: pa.Array | pa.ChunkedArray | None, n: int) -> pa.Array:
    """A text column as plain strings (dictionary, view and large strings decoded); all null when absent."""
    if col is None:
        return pa.nulls(n, pa.string())
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col if col.type == pa.string() else col.cast(pa.string())


def _bounds(cfg: CascadeConfig, column: str) -> tuple[float | None, float | None]:
    stage, name = OVERRIDES[column]
    info = type(getattr(cfg, stage)).model_fields[name]
    lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
    hi = next((m.le for m in info.metadata if hasattr(m, "le")), None)
    return lo, hi


def override_problem(cfg: CascadeConfig, column: str, value: float) -> str | None:
    lo, hi = _bounds(cfg, column)
    if not math.isfinite(value):
        return f"{column} = {value!r} is not a finite number; expected a number in [{lo}, {hi}] or null (the default)"
    if PARAM_TYPES[OVERRIDES[column][1]] is int and value != int(value):
        return f"{column} = {value!r} is not a whole number"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"{column} = {value!r} is outside [{lo}, {hi}]"
    return None


@dataclass
class Validator:
    """Feed it the table's batches in order (`add`), then `finish` for the accepted rows and the rejected ones."""

    cfg: CascadeConfig
    rows: int = 0  # rows seen
    occurrences: dict[int, int] = field(default_factory=dict)  # (prompt, negative) digest -> rows without id so far
    # the candidates: rows that passed every check before the id's uniqueness, as compact Arrow columns
    kept: list[pa.Table] = field(default_factory=list)
    late: dict[int, str] = field(default_factory=dict)  # candidate row -> its seed/n/override reason, if any
    rejected: list[Rejected] = field(default_factory=list)

    def add(self, cols: dict[str, pa.Array]) -> None:
        """One batch: {our column name: its values} (prompt required; id, negative_prompt, seed, n and the override
        columns as the table has them)."""
        cfg = self.cfg
        n = len(cols["prompt"])
        start, self.rows = self.rows, self.rows + n
        prompt = _text(cols["prompt"], n)
        negative = pc.fill_null(_text(cols.get("negative_prompt"), n), "")
        reason = np.full(n, None, dtype=object)

        def flag(mask, why) -> None:
            """Give each row in `mask` that has no reason yet the reason why(i) (i: its index in the batch)."""
            hits = np.flatnonzero(np.asarray(pc.fill_null(mask, False), dtype=bool) & (reason == None))  # noqa: E711
            for i in hits:
                reason[i] = why(int(i))

        null = pc.is_null(prompt)
        flag(null, lambda i: f"row {start + i}: prompt is null; a non-empty string is expected")
        visible = pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.fill_null(prompt, ""), INVISIBLE, ""))
        flag(
            pc.equal(visible, ""),
            lambda i: (
                f"row {start + i}: prompt is empty (blank or invisible characters only); a non-empty string is expected"
            ),
        )
        limit = cfg.data.max_prompt_chars
        flag(
            pc.greater(pc.utf8_length(prompt), limit),
            lambda i: (
                f"row {start + i}: prompt is {len(prompt[i].as_py()):,} characters; at most "
                f"data.max_prompt_chars = {limit:,} are accepted"
            ),
        )
        for text, what in ((prompt, "prompt"), (negative, "negative_prompt")):
            flag(
                pc.match_substring_regex(text, CONTROL), lambda i, t=text, w=what: _control(start + i, w, t[i].as_py())
            )

        raw = cols.get("id")
        given = _text(raw if raw is None or not pa.types.is_integer(raw.type) else raw.cast(pa.string()), n)
        need = np.flatnonzero(np.asarray(pc.is_null(given), dtype=bool) & (reason == None))  # noqa: E711
        defaults = []
        if len(need):  # the rows without an id get one, in table order (unless already rejected)
            take = pa.array(need)
            for p, neg in zip(prompt.take(take).to_pylist(), negative.take(take).to_pylist(), strict=True):
                key = int.from_bytes(hashlib.blake2b(f"{p}\x00{neg}".encode(), digest_size=8).digest(), "big")
                k = self.occurrences.get(key, 0)
                self.occurrences[key] = k + 1
                defaults.append(default_id(p, neg, k))
        mask = np.zeros(n, bool)
        mask[need] = True
        id_arr = pc.replace_with_mask(given, pa.array(mask), pa.array(defaults, pa.string())) if len(need) else given
        flag(
            pc.invert(pc.match_substring_regex(given, SAFE_ID.pattern)),
            lambda i: (
                f"row {start + i}: id {given[i].as_py()!r} is not a safe file name; expected 1-128 characters "
                f"of letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
        )
        flag(
            pc.match_substring_regex(given, RESERVED.pattern, ignore_case=True),
            lambda i: (
                f"row {start + i}: id {given[i].as_py()!r} is a reserved device name on Windows; expected another id"
            ),
        )
        # The checks after the id's uniqueness: a row failing them is still a candidate (a duplicate id is its
        # reason then), but never claims its id.
        early = reason.copy()
        seed = cols.get("seed")
        if seed is not None:
            unsigned = pa.types.is_unsigned_integer(seed.type)
            none = pa.array(np.zeros(n, bool))
            high = pc.greater(seed, pa.scalar(SEED_MAX, seed.type)) if seed.type.bit_width == 64 else none
            low = none if unsigned else pc.less(seed, pa.scalar(0, seed.type))
            flag(
                pc.or_(low, high),
                lambda i: f"row {start + i}: seed {seed[i].as_py()!r} is outside [0, 2**63 - 1]",
            )
        count = cols.get("n")
        if count is not None:
            flag(
                pc.or_(pc.less(count, 1), pc.greater(count, MAX_IMAGES_PER_PROMPT)),
                lambda i: (
                    f"row {start + i}: {cfg.data.images_column} = {count[i].as_py()!r} images per prompt is "
                    f"outside [1, {MAX_IMAGES_PER_PROMPT}]"
                ),
            )
        overrides = {c: cols[c].cast(pa.float64()) for c in OVERRIDES if c in cols}
        for c, values in overrides.items():
            lo, hi = _bounds(cfg, c)
            bad = pc.invert(pc.is_finite(values))
            if PARAM_TYPES[OVERRIDES[c][1]] is int:
                bad = pc.or_(bad, pc.not_equal(values, pc.floor(values)))
            if lo is not None:
                bad = pc.or_(bad, pc.less(values, lo))
            if hi is not None:
                bad = pc.or_(bad, pc.greater(values, hi))
            flag(bad, lambda i, c=c: f"row {start + i}: {override_problem(cfg, c, cols[c][i].as_py())}")

        candidate = early == None  # noqa: E711
        for i in np.flatnonzero(~candidate):
            self.rejected.append(Rejected(start + int(i), id_arr[int(i)].as_py(), prompt[int(i)].as_py(), early[i]))
        for i in np.flatnonzero(candidate & (reason != None)):  # noqa: E711
            self.late[start + int(i)] = reason[i]
        table = {  # only the columns the table has (finish adds the others): less to hold for every row
            "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "id": id_arr,
            "prompt": prompt,
            "negative_prompt": negative,
            "seed": seed.cast(pa.int64(), safe=False) if seed is not None else pa.nulls(n, pa.int64()),
            **({"n": count.cast(pa.int64(), safe=False)} if count is not None else {}),
            **overrides,
        }
        t = pa.table(table)
        self.kept.append(t if candidate.all() else t.filter(pa.array(candidate)))

    def finish(self) -> tuple[pa.Table, list[Rejected]]:
        """The accepted rows (KEEP columns, seeds and n filled in) and every rejected row, in table order.

        A candidate claims its id when it passed every check (`late` holds those that did not). The first claimer
        of an id, case aside, is accepted; a later candidate whose id equals an accepted row's is a duplicate, one
        that equals it but for case collides, and any other keeps its own (late) reason."""
        cfg = self.cfg
        t = pa.concat_tables(self.kept, promote_options="default") if self.kept else pa.table({"row": [], "id": []})
        for c, typ in [("row", pa.int64()), ("id", pa.string()), ("prompt", pa.string())]:
            if c not in t.column_names:
                t = t.append_column(c, pa.array([], typ))
        for c in ("negative_prompt", "seed", "n", *OVERRIDES):
            if c not in t.column_names:
                typ = pa.string() if c == "negative_prompt" else pa.float64() if c in OVERRIDES else pa.int64()
                t = t.append_column(c, pa.nulls(t.num_rows, typ))
        t = t.select(KEEP)
        rows = t.column("row").to_numpy()
        pos = np.arange(len(rows))
        claims = ~np.isin(rows, np.fromiter(self.late, dtype=np.int64, count=len(self.late)))
        ids = t.column("id").combine_chunks()
        first = _first_claim(pc.utf8_lower(ids), claims, pos)
        accepted_mask = claims & (first == pos)
        id_list = ids.to_pylist() if (~accepted_mask).any() else []
        out = []
        for j in np.flatnonzero(~accepted_mask):
            row, rid, f = int(rows[j]), id_list[j], int(first[j])
            if f < j and id_list[f] == rid:
                why = f"row {row}: duplicate id {rid!r} (first used by row {int(rows[f])})"
            elif f < j:
                why = (
                    f"row {row}: id {rid!r} differs only in case from row {int(rows[f])}'s {id_list[f]!r}; "
                    f"their files would collide on a case-insensitive filesystem"
                )
            else:
                why = self.late[row]
            out.append(Rejected(row, rid, t.column("prompt")[int(j)].as_py(), why))
        accepted = t if accepted_mask.all() else t.filter(pa.array(accepted_mask))
        given = accepted.column("seed").combine_chunks()
        missing = np.flatnonzero(np.asarray(pc.is_null(given), dtype=bool))
        seeds = np.asarray(pc.fill_null(given, 0), dtype=np.int64).copy()
        for j, rid in zip(missing, accepted.column("id").take(pa.array(missing)).to_pylist(), strict=True):
            seeds[j] = derive_seed(cfg.seed, rid)  # a row without a seed: derived from the run seed and its id
        accepted = accepted.set_column(accepted.schema.get_field_index("seed"), "seed", pa.array(seeds))
        filled = pc.fill_null(accepted.column("n"), cfg.data.images_per_prompt)
        accepted = accepted.set_column(accepted.schema.get_field_index("n"), "n", filled)
        rejected = sorted(self.rejected + out, key=lambda r: r.row)
        return accepted, rejected


def _first_claim(keys: pa.Array, claims: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """For each row, the position of the first row with the same key that claims it (len(pos) when none does)."""
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    first = np.full(int(codes.max()) + 1 if len(codes) else 0, len(pos), dtype=np.int64)
    np.minimum.at(first, codes[claims], pos[claims])
    return first[codes]


def _control(row: int, what: str, text: str) -> str:
    bad = CONTROL_RE.search(text)
    return (
        f"row {row}: {what} holds the control character {bad.group()!r} at position {bad.start()}; "
        f"expected text (tabs and line breaks are fine)"
    )
