"""Every row's stage parameters are resolved once, when the table is read, by one rule."""

from __future__ import annotations

import pyarrow as pa

from ifbatch.configs import load_config
from ifbatch.models.params import PARAMS, StageParams
from ifbatch.models.timesteps import schedule
from ifbatch.tasks.inputs.params import param_fields, resolve_params
from ifbatch.tasks.inputs.prompts import read_prompts

from ..helpers import write_table


def test_row_override_else_named_schedule_else_config(tmp_path):
    cfg = load_config("tiny", ["stage_1.timesteps=fast27", "stage_2.guidance_scale=5.5"])
    path = write_table(
        tmp_path / "p.parquet",
        {"prompt": ["a", "b", "c"], "stage_1_steps": [None, 9, None], "stage_2_guidance_scale": [None, None, 2.0]},
    )
    rows = read_prompts(path, cfg).rows.to_pylist()
    assert [(r["stage_1_steps"], r["stage_1_timesteps"]) for r in rows] == [
        (len(schedule("fast27")), "fast27"),
        (9, None),
        (len(schedule("fast27")), "fast27"),
    ]
    assert [r["stage_2_guidance_scale"] for r in rows] == [5.5, 5.5, 2.0]
    assert {(r["stage_2_steps"], r["stage_2_noise_level"], r["stage_3_noise_level"]) for r in rows} == {(4, 250, 100)}

    assert [f.name for f in param_fields()] == [
        n for n in read_prompts(path, cfg).rows.column_names if n.startswith("stage_")
    ]


def test_noise_levels_are_per_row_where_the_stage_has_one(tmp_path):
    path = write_table(
        tmp_path / "p.parquet",
        {"prompt": ["a", "b"], "stage_2_noise_level": [None, 400], "stage_3_noise_level": [20.0, None]},
    )
    rows = read_prompts(path, load_config("tiny")).rows.to_pylist()
    assert [(r["stage_2_noise_level"], r["stage_3_noise_level"]) for r in rows] == [(250, 20), (400, 100)]
    assert "stage_1_noise_level" not in read_prompts(path, load_config("tiny")).rows.column_names


def test_without_overrides_every_row_gets_the_config_values():
    cfg = load_config("if-xl")
    cols = resolve_params({}, 2, cfg)
    for stage, names in PARAMS.items():
        expect = StageParams.of(getattr(cfg, stage))
        for name in names:
            assert cols[f"{stage}_{name}"].to_pylist() == [getattr(expect, name)] * 2


def test_override_types_are_the_manifest_types():
    cols = resolve_params({"stage_1_steps": pa.array([3.0, None])}, 2, load_config("if-xl"))
    assert cols["stage_1_steps"].type == pa.int64() and cols["stage_1_steps"].to_pylist() == [3, 100]


def test_every_named_schedule_is_the_list_diffusers_ships():
    """The schedules a stage passes as `timesteps=` are diffusers' own, for every name the config accepts (the
    parity harness runs a pair of them against the card's calls: tests/run/test_parity.py)."""
    import typing

    from diffusers.pipelines.deepfloyd_if import timesteps

    from ifbatch.configs.schema import Stage1Config, TimestepPreset

    names = typing.get_args(TimestepPreset)
    shipped = {n.removesuffix("_timesteps") for n in dir(timesteps) if n.endswith("_timesteps")}
    assert set(names) == shipped
    for name in names:
        kwargs = StageParams.of(Stage1Config(timesteps=name)).schedule_kwargs()
        assert kwargs == {"timesteps": list(getattr(timesteps, f"{name}_timesteps"))}, name
