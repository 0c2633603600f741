"""The bad-input corpus, table-driven: every case says what is wrong, where (file, part, row, column or key) and
what was expected; nothing already in the output is touched.

Refusals (table, config, CLI, output) go through `ifbatch run` in process and must exit 2 before anything starts:
the run's generation step is replaced by a guard that fails the test if a refused case got that far. Row problems
reject that row only, with its reason; the exit status of a run with rejected rows (1) is checked end to end by
tests/run/test_run.py::test_bad_rows_exit_non_zero, on the same row corpus. Stores that cannot be reached or
refuse: tests/run/test_storage_errors.py (they need a server).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ifbatch.configs import load_config
from ifbatch.flows import cli
from ifbatch.tasks.inputs.prompts import read_prompts
from tests.certs import make_chain

from ..helpers import EXAMPLES


def table(path: Path, columns: dict, schema: pa.Schema | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return str(path)


def parts(folder: Path, *tables: dict) -> str:
    for i, cols in enumerate(tables):
        table(folder / f"part-{i}.parquet", cols)
    return str(folder)


def truncated(path: Path) -> str:
    table(path, {"prompt": ["a cat"] * 100})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def text_file(path: Path) -> str:
    path.write_text("prompt\na cat\n")
    return str(path)


def empty_folder(path: Path) -> str:
    path.mkdir()
    return str(path)


def delta_table(path: Path) -> str:
    """A Delta Lake table's folder: its Parquet parts, and the log that says which of them are the table."""
    parts(path, {"prompt": ["a cat", "an old row, since deleted"]}, {"prompt": ["a cat"]})
    (path / "_delta_log").mkdir()
    (path / "_delta_log" / "00000000000000000000.json").write_text('{"protocol": {"minReaderVersion": 1}}\n')
    return str(path)


def iceberg_table(path: Path) -> str:
    table(path / "data" / "part-0.parquet", {"prompt": ["a cat"]})
    (path / "metadata").mkdir()
    (path / "metadata" / "v1.metadata.json").write_text("{}")
    return str(path)


# (case, how to make the prompts (tmp -> path), extra CLI args, words the message must hold)
REFUSED = [
    ("missing file", lambda t: str(t / "nope.parquet"), [], ["nope.parquet", "does not exist"]),
    ("empty folder", lambda t: empty_folder(t / "empty"), [], ["no Parquet files in", "empty"]),
    ("truncated parquet", lambda t: truncated(t / "cut.parquet"), [], ["cut.parquet", "cannot read"]),
    ("csv, not parquet", lambda t: text_file(t / "p.parquet"), [], ["p.parquet", "as Parquet"]),
    ("0-row table", lambda t: table(t / "z.parquet", {"prompt": pa.array([], pa.string())}), [], ["0 rows"]),
    ("no prompt column", lambda t: table(t / "p.parquet", {"caption": ["a"]}), [], ["no column 'prompt'", "caption"]),
    ("prompt is int", lambda t: table(t / "p.parquet", {"prompt": [1]}), [], ["'prompt'", "int64", "expected string"]),
    (
        "seed is text",
        lambda t: table(t / "p.parquet", {"prompt": ["a"], "seed": ["1"]}),
        [],
        ["'seed'", "expected integer"],
    ),
    ("n is float", lambda t: table(t / "p.parquet", {"prompt": ["a"], "n": [1.5]}), [], ["'n'", "images per prompt"]),
    (
        "id is float",
        lambda t: table(t / "p.parquet", {"prompt": ["a"], "id": [1.5]}),
        [],
        ["'id'", "string or integer"],
    ),
    (
        "steps is text",
        lambda t: table(t / "p.parquet", {"prompt": ["a"], "stage_1_steps": ["9"]}),
        [],
        ["'stage_1_steps'", "expected a number"],
    ),
    (
        "overrides off",
        lambda t: table(t / "p.parquet", {"prompt": ["a"], "stage_1_steps": [9]}),
        ["--set", "data.row_overrides=false"],
        ["stage_1_steps", "data.row_overrides is false"],
    ),
    (
        "--prompt-column absent",
        lambda t: table(t / "p.parquet", {"prompt": ["a"]}),
        ["--prompt-column", "caption"],
        ["no column 'caption'"],
    ),
    (
        "part with int prompt",
        lambda t: parts(t / "d", {"prompt": ["a"]}, {"prompt": [7]}),
        [],
        ["part-1.parquet", "'prompt'", "int64"],
    ),
    (
        "part without prompt",
        lambda t: parts(t / "d", {"prompt": ["a"]}, {"text": ["b"]}),
        [],
        ["part-1.parquet", "no column 'prompt'"],
    ),
    (
        "part with a seed the first lacks",
        lambda t: parts(t / "d", {"prompt": ["a"]}, {"prompt": ["b"], "seed": [5]}),
        [],
        ["part-1.parquet", "['seed']", "first part lacks"],
    ),
    (
        "part with other seed type",
        lambda t: parts(t / "d", {"prompt": ["a"], "seed": [1]}, {"prompt": ["b"], "seed": [2.0]}),
        [],
        ["part-1.parquet", "'seed'"],
    ),
    ("section set to a number", None, ["--set", "stage_1=5"], ["stage_1 = 5", "is a section", "stage_1.steps"]),
    ("section set to a list", None, ["--set", "stage_1=[1, 2]"], ["stage_1 = [1, 2]", "is a section"]),
    ("unknown key", None, ["--set", "stage_1.stepz=5"], ["unknown key 'stage_1.stepz'", "steps"]),
    ("unknown section", None, ["--set", "stage_9.steps=5"], ["unknown key 'stage_9'"]),
    ("wrong type", None, ["--set", "stage_1.steps=many"], ["stage_1.steps = 'many'", "integer"]),
    ("out of range", None, ["--set", "stage_1.steps=-3"], ["stage_1.steps = -3", "greater than or equal"]),
    ("not key=value", None, ["--set", "stage_1.steps"], ["stage_1.steps", "key=value"]),
    ("bad format", None, ["--set", "output.format=zip"], ["output.format = 'zip'", "files", "webdataset"]),
    ("zero shard samples", None, ["--set", "output.shard_samples=0"], ["output.shard_samples = 0"]),
    ("NaN in config", None, ["--set", "stage_1.guidance_scale=.nan"], ["stage_1.guidance_scale", "nan"]),
    ("output is a file", None, ["@file-output"], ["is a file", "expected a folder"]),
    ("a Delta Lake table", lambda t: delta_table(t / "delta"), [], ["is a Delta Lake table", "_delta_log", "deleted"]),
    ("an Iceberg table", lambda t: iceberg_table(t / "ice"), [], ["is an Iceberg table", "metadata.json"]),
    ("a glob matching nothing", lambda t: str(t / "in" / "*.parquet"), [], ["*.parquet", "matches no file"]),
    ("output inside the prompts", None, ["@output-inside"], ["is inside the prompts folder", "elsewhere"]),
]


@pytest.fixture
def guarded(monkeypatch):
    def never(*a, **kw):
        raise AssertionError("a refused run got past preflight into generation")

    monkeypatch.setattr(cli, "_generate", never)


@pytest.mark.parametrize("case, make, args, words", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_before_anything_starts(case, make, args, words, tmp_path, capsys, guarded):
    prompts = make(tmp_path) if make else str(EXAMPLES)
    out = tmp_path / "out"
    (out / "manifest").mkdir(parents=True)
    earlier = out / "manifest" / "part-earlier-00000.parquet"
    earlier.write_bytes(b"an earlier run's part")  # must survive every refusal untouched
    if "@file-output" in args:
        args, out = [], tmp_path / "out.txt"
        out.write_text("not a folder")
    inside = ["p", "part-0.parquet"] if "@output-inside" in args else []
    if inside:  # the prompts folder is the one holding the earlier output
        args, prompts = [], parts(tmp_path / "out" / "p", {"prompt": ["a"]})
        prompts, out = str(tmp_path / "out"), tmp_path / "out" / "p" / "images-out"
    code = cli.main(["run", prompts, str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    for w in words:
        assert w in err, f"{case}: {w!r} not in {err!r}"
    kept = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    assert earlier.read_bytes() == b"an earlier run's part"
    assert kept == sorted(["manifest", "part-earlier-00000.parquet", *inside])


def test_a_signer_that_cannot_sign_is_refused_before_anything_starts(tmp_path, capsys, guarded):
    """output.c2pa: an expired certificate, or a key file that cannot be read, is refused naming the file and why,
    before the cluster, a model or the output is touched."""
    expired = make_chain(tmp_path / "certs", valid_from=dt.timedelta(days=-10), valid_for=dt.timedelta(days=1))
    gone = tmp_path / "certs" / "gone.key"
    cases = [
        (expired.overrides, [f"output.c2pa.cert_file = '{expired.cert_file}'", "expired on"]),
        ([expired.overrides[0], f"output.c2pa.key_file={gone}"], [f"output.c2pa.key_file = '{gone}'", "cannot read"]),
    ]
    for overrides, words in cases:
        sets = [a for o in overrides for a in ("--set", o)]
        code = cli.main(["run", str(EXAMPLES), str(tmp_path / "out"), "--no-progress", *sets])
        err = capsys.readouterr().err
        assert code == 2 and all(w in err for w in words), err
        assert not (tmp_path / "out").exists()


def test_a_quoted_glob_is_expanded_and_hive_partition_keys_are_columns(tmp_path):
    cfg = load_config("tiny")
    for seed in (5, 7):
        table(tmp_path / "in" / f"seed={seed}" / "part-0.parquet", {"prompt": [f"a cat {seed}", f"a dog {seed}"]})
    plan = read_prompts(str(tmp_path / "in"), cfg)
    got = {r["prompt"]: r["seed"] for r in plan.rows.select(["prompt", "seed"]).to_pylist()}
    assert got == {"a cat 5": 5, "a dog 5": 5, "a cat 7": 7, "a dog 7": 7}
    plan = read_prompts(str(tmp_path / "in" / "seed=*" / "*.parquet"), cfg)  # as a shell that was told not to
    assert sorted(plan.rows.column("prompt").to_pylist()) == ["a cat 5", "a cat 7", "a dog 5", "a dog 7"]


def test_accepted_string_encodings(tmp_path):
    """Dictionary-encoded (pandas `category`) and view strings are strings."""
    cfg = load_config("tiny")
    dictionary = pa.array(["a cat", "a dog", "a cat"]).dictionary_encode()
    for typ, col in (("dictionary", dictionary), ("string_view", pa.array(["a", "b"], pa.string_view()))):
        plan = read_prompts(table(tmp_path / f"{typ}.parquet", {"prompt": col}), cfg)
        assert plan.rows.num_rows == len(col) and not plan.rejected, typ
        assert plan.rows.column("prompt").to_pylist() == col.to_pylist()


# (case, column values for one row beside a good row 0, words the reason must hold)
ROWS = [
    ("null prompt", {"prompt": None}, ["row 1", "prompt is null"]),
    ("blank prompt", {"prompt": "   "}, ["row 1", "prompt is empty"]),
    ("zero-width spaces only", {"prompt": "\u200b\u200b \ufeff"}, ["row 1", "prompt is empty", "invisible"]),
    ("C1 control in prompt", {"prompt": "a\x85cat"}, ["row 1", "'\\x85'", "position 1"]),
    ("1 MB prompt", {"prompt": "x" * (1 << 20)}, ["row 1", "1,048,576 characters", "data.max_prompt_chars"]),
    ("NUL in prompt", {"prompt": "a\x00cat"}, ["row 1", "prompt", "'\\x00'", "position 1"]),
    ("escape in prompt", {"prompt": "a\x1bcat"}, ["row 1", "'\\x1b'"]),
    ("bell in negative", {"negative_prompt": "ugly\x07"}, ["row 1", "negative_prompt", "'\\x07'"]),
    ("id .", {"id": "."}, ["row 1", "id '.'", "not a safe file name"]),
    ("id ..", {"id": ".."}, ["row 1", "id '..'"]),
    ("id -rf", {"id": "-rf"}, ["row 1", "id '-rf'"]),
    ("id CON", {"id": "CON"}, ["row 1", "id 'CON'", "reserved device name"]),
    ("id nul.txt", {"id": "nul.txt"}, ["row 1", "reserved"]),
    ("129-char id", {"id": "a" * 129}, ["row 1", "1-128 characters"]),
    ("id with slash", {"id": "a/b"}, ["row 1", "'a/b'"]),
    ("duplicate id", {"id": "r0"}, ["row 1", "duplicate id 'r0'", "row 0"]),
    ("case-colliding id", {"id": "R0"}, ["row 1", "'R0'", "differs only in case", "'r0'"]),
    ("seed 2**63", {"seed": 2**63}, ["row 1", "seed 9223372036854775808", "outside"]),
    ("seed max uint64", {"seed": 2**64 - 1}, ["row 1", "outside"]),
    ("n = 0", {"n": 0}, ["row 1", "n = 0", "outside [1, 10000]"]),
    ("n = 10001", {"n": 10_001}, ["row 1", "n = 10001"]),
    ("NaN steps", {"stage_1_steps": math.nan}, ["row 1", "stage_1_steps = nan", "not a finite number"]),
    ("inf steps", {"stage_2_steps": math.inf}, ["row 1", "stage_2_steps = inf", "not a finite number"]),
    ("NaN guidance", {"stage_1_guidance_scale": math.nan}, ["row 1", "stage_1_guidance_scale = nan", "finite"]),
    ("-inf guidance", {"stage_2_guidance_scale": -math.inf}, ["row 1", "-inf"]),
    ("2.5 steps", {"stage_1_steps": 2.5}, ["row 1", "stage_1_steps = 2.5", "not a whole number"]),
    ("0 steps", {"stage_3_steps": 0.0}, ["row 1", "stage_3_steps = 0.0", "outside"]),
    ("noise 351", {"stage_3_noise_level": 351.0}, ["row 1", "stage_3_noise_level = 351.0", "outside [0, 350]"]),
    ("noise 2.5", {"stage_2_noise_level": 2.5}, ["row 1", "stage_2_noise_level = 2.5", "not a whole number"]),
]
TYPES = {
    "prompt": pa.string(),
    "negative_prompt": pa.string(),
    "id": pa.string(),
    "seed": pa.uint64(),
    "n": pa.int64(),
    **{f"stage_{s}_steps": pa.float64() for s in (1, 2, 3)},
    **{f"stage_{s}_guidance_scale": pa.float64() for s in (1, 2, 3)},
    **{f"stage_{s}_noise_level": pa.float64() for s in (2, 3)},
}
GOOD = {"prompt": "a photo of a cat", "id": "r0", "seed": 1, "n": 1}


def row_corpus(path: Path) -> tuple[str, list[list[str]]]:
    """One table holding every row case after a good row (row 0), each case's bad row with a fresh id where the
    case is not about the id; returns the table and the words each case's reason must hold (with its row)."""
    rows, words = [dict(GOOD)], []
    for k, (_, bad, expect) in enumerate(ROWS, start=1):
        row = {**GOOD, "prompt": f"{GOOD['prompt']} {k}", "id": f"x{k}", **bad}
        rows.append(row)
        words.append([w.replace("row 1", f"row {k}") for w in expect])
    cols = {c: [r.get(c) for r in rows] for c in TYPES}
    return table(path, cols, pa.schema([(c, TYPES[c]) for c in cols])), words


def test_each_bad_row_is_rejected_with_its_reason_and_the_rest_go_on(tmp_path):
    prompts, words = row_corpus(tmp_path / "rows.parquet")
    plan = read_prompts(prompts, load_config("tiny"))
    assert plan.rows.column("id").to_pylist() == ["r0"]  # the good row, and only it
    reasons = {r.row: r.reason for r in plan.rejected}
    assert sorted(reasons) == list(range(1, len(ROWS) + 1))
    for k, ((case, _, _), expect) in enumerate(zip(ROWS, words, strict=True), start=1):
        for w in expect:
            assert w in reasons[k], f"{case}: {w!r} not in {reasons[k]!r}"


def test_validation_is_the_same_whatever_the_batches(tmp_path):
    """Ids, seeds, duplicates across batches and every reason come out the same read 3 rows at a time as whole;
    rows without an id get the same stable ids as always (default_id of the prompt, its negative and how often
    the pair came before)."""
    from ifbatch.tasks.inputs.prompts import default_id

    prompts, _ = row_corpus(tmp_path / "rows.parquet")
    more = table(
        tmp_path / "dups.parquet",
        {
            "prompt": ["a", "a", "b", "a", "c", "c", "a"],
            "id": [None, None, "x", None, "X", "x", None],
            "seed": [None, 5, None, None, None, None, 2**70 % 2**63],
        },
    )
    for path in (prompts, more):
        whole = read_prompts(path, load_config("tiny"))
        small = read_prompts(path, load_config("tiny", ["data.read_batch_rows=3"]))
        assert whole.rows.equals(small.rows) and whole.rejected == small.rejected and whole.total == small.total
    plan = read_prompts(more, load_config("tiny", ["data.read_batch_rows=2"]))
    got = plan.rows.select(["row", "id"]).to_pylist()
    ids = [default_id("a", "", k) for k in range(4)]
    assert got == [{"row": 0, "id": ids[0]}, {"row": 1, "id": ids[1]}, {"row": 2, "id": "x"}, {"row": 3, "id": ids[2]},
                   {"row": 6, "id": ids[3]}]  # fmt: skip
    assert [(r.row, r.reason.split(": ", 1)[1]) for r in plan.rejected] == [
        (4, "id 'X' differs only in case from row 2's 'x'; their files would collide on a case-insensitive filesystem"),
        (5, "duplicate id 'x' (first used by row 2)"),
    ]
