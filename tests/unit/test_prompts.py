"""Prompt tables: table-level problems fail fast and name the file and column; bad rows are rejected alone."""

import pyarrow as pa
import pytest

from ifbatch.configs import load_config
from ifbatch.tasks.inputs.prompts import PromptTableError, default_id, read_prompts

from ..helpers import write_table

CFG = load_config("tiny")


def test_ids_and_seeds_are_stable_and_derived(tmp_path):
    path = write_table(tmp_path / "t.parquet", {"prompt": ["a cat", "a cat", "a dog"]})
    a, b = read_prompts(path, CFG), read_prompts(path, CFG)
    assert a.rows.to_pylist() == b.rows.to_pylist()
    ids = a.rows.column("id").to_pylist()
    assert len(set(ids)) == 3 and ids[0] == default_id("a cat", "", 0) and ids[1] == default_id("a cat", "", 1)
    seeds = a.rows.column("seed").to_pylist()
    assert len(set(seeds)) == 3
    other = read_prompts(path, load_config("tiny", ["seed=1"]))
    assert other.rows.column("seed").to_pylist() != seeds  # the run seed feeds the derived seeds


def test_given_ids_and_seeds_are_kept(tmp_path):
    path = write_table(
        tmp_path / "t.parquet",
        {"prompt": ["a", "b"], "id": ["x-1", "x_2"], "seed": [5, 6], "negative_prompt": [None, "ugly"]},
    )
    rows = read_prompts(path, CFG).rows.to_pylist()
    assert [(r["id"], r["seed"], r["negative_prompt"]) for r in rows] == [("x-1", 5, ""), ("x_2", 6, "ugly")]


def test_bad_rows_are_rejected_with_reasons_and_the_rest_go_on(tmp_path):
    path = write_table(
        tmp_path / "t.parquet",
        {
            "prompt": ["ok one", None, "  ", "dup", "dup again", "slash", "neg seed", "ok two", "too many steps"],
            "id": ["a", "b", "c", "a", "e", "../etc/passwd", "g", "h", "i"],
            "seed": [1, 2, 3, 4, 5, 6, -1, 8, 9],
            "stage_1_steps": [None, None, None, None, None, None, None, 3, 5000],
        },
    )
    plan = read_prompts(path, CFG)
    assert plan.rows.column("id").to_pylist() == ["a", "e", "h"]
    assert plan.total == 9
    reasons = {r.row: r.reason for r in plan.rejected}
    assert "prompt is null" in reasons[1] and "prompt is empty" in reasons[2]
    assert "duplicate id 'a' (first used by row 0)" in reasons[3]
    assert "'../etc/passwd' is not a safe file name" in reasons[5]
    assert "seed -1" in reasons[6]
    assert "stage_1_steps = 5000" in reasons[8] and "[1, 1000]" in reasons[8]
    assert plan.rows.to_pylist()[2]["stage_1_steps"] == 3


def test_a_folder_of_parts_is_read_in_batches(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    write_table(d / "part-0.parquet", {"prompt": [f"p{i}" for i in range(5)]})
    write_table(d / "part-1.parquet", {"prompt": [f"q{i}" for i in range(4)]})
    plan = read_prompts(str(d), load_config("tiny", ["data.read_batch_rows=2"]))
    assert plan.total == 9 and plan.rows.num_rows == 9


def test_column_mapping(tmp_path):
    path = write_table(tmp_path / "t.parquet", {"caption": ["a cat"], "key": ["k1"]})
    plan = read_prompts(path, load_config("tiny", ["data.prompt_column=caption", "data.id_column=key"]))
    assert plan.rows.to_pylist()[0]["prompt"] == "a cat" and plan.rows.to_pylist()[0]["id"] == "k1"


def test_missing_prompt_column_names_file_and_column(tmp_path):
    path = write_table(tmp_path / "t.parquet", {"caption": ["a cat"]})
    with pytest.raises(PromptTableError) as e:
        read_prompts(path, CFG)
    assert path in str(e.value) and "no column 'prompt'" in str(e.value) and "'caption'" in str(e.value)


def test_wrong_column_type_is_named(tmp_path):
    path = write_table(tmp_path / "t.parquet", {"prompt": ["a"], "seed": ["not a number"]})
    with pytest.raises(PromptTableError, match=r"column 'seed' has type string, expected integer"):
        read_prompts(path, CFG)
    path = write_table(tmp_path / "u.parquet", {"prompt": [1, 2]})
    with pytest.raises(PromptTableError, match=r"column 'prompt' has type int64, expected string"):
        read_prompts(path, CFG)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(PromptTableError, match=r"bad.parquet"):
        read_prompts(str(bad), CFG)
    with pytest.raises(PromptTableError, match=r"nope.parquet' does not exist"):
        read_prompts(str(tmp_path / "nope.parquet"), CFG)


def test_overrides_need_the_config_to_allow_them(tmp_path):
    path = write_table(tmp_path / "t.parquet", {"prompt": ["a"], "stage_2_guidance_scale": [3.0]})
    with pytest.raises(PromptTableError, match=r"stage_2_guidance_scale.*row_overrides is false"):
        read_prompts(path, load_config("tiny", ["data.row_overrides=false"]))


def test_large_string_columns_are_accepted(tmp_path):
    path = write_table(tmp_path / "t.parquet", {"prompt": pa.array(["a cat"], pa.large_string())})
    assert read_prompts(path, CFG).rows.num_rows == 1


def test_images_per_prompt_from_the_config_and_the_n_column(tmp_path):
    path = write_table(tmp_path / "p.parquet", {"prompt": ["a", "b", "c", "d", "e"], "n": [3, None, 0, 10_001, 1]})
    plan = read_prompts(path, load_config("tiny", ["data.images_per_prompt=2"]))
    assert plan.rows.column("images").to_pylist() == [[0, 1, 2], [0, 1], [0]]
    assert [r.reason for r in plan.rejected] == [
        "row 2: n = 0 images per prompt is outside [1, 10000]",
        "row 3: n = 10001 images per prompt is outside [1, 10000]",
    ]
    words = write_table(tmp_path / "w.parquet", {"prompt": ["a"], "copies": ["3"]})
    with pytest.raises(PromptTableError, match="column 'copies' has type string, expected integer"):
        read_prompts(words, load_config("tiny", ["data.images_column=copies"]))
