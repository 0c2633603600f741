"""Every row's effective stage parameters, worked out once when the table is read.

The rule, here and nowhere else: a row's `stage_N_steps` / `stage_N_guidance_scale` wins; else the config's
named timestep schedule (whose length is then the step count); else the config's steps and guidance. The
stages group rows on these columns and run them as they are; the manifest copies them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs.schema import CascadeConfig
from ifbatch.models.params import PARAM_TYPES, PARAMS, ROW_OVERRIDES, StageParams

ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string()}
# Per-row override columns -> (stage, parameter)
OVERRIDES = {
    f"{stage}_{name}": (stage, name) for stage, names in PARAMS.items() for name in ROW_OVERRIDES if name in names
}


def param_fields() -> list[pa.Field]:
    """The resolved parameter columns, as the work table and the manifest hold them."""
    return [pa.field(f"{stage}_{name}", ARROW[PARAM_TYPES[name]]) for stage, names in PARAMS.items() for name in names]


def resolve_params(overrides: dict[str, pa.Array], rows: int, cfg: CascadeConfig) -> dict[str, pa.Array]:
    """`overrides`: the override columns a table had (nullable). Returns every resolved parameter column."""
    out: dict[str, pa.Array] = {}
    for stage, names in PARAMS.items():
        d = StageParams.of(getattr(cfg, stage))
        steps = overrides.get(f"{stage}_steps")
        for name in names:
            column, default = f"{stage}_{name}", getattr(d, name)
            typ = ARROW[PARAM_TYPES[name]]
            given = overrides.get(column)
            if name == "timesteps":  # a row's own step count replaces the named schedule
                fill = pa.array([default] * rows, typ)
                out[column] = fill if steps is None else pc.if_else(pc.is_null(steps), fill, pa.nulls(rows, typ))
            elif given is None:
                out[column] = pa.array([default] * rows, typ)
            else:
                out[column] = pc.coalesce(given.cast(typ), pa.scalar(default, typ))
    return out


def row_params(row: dict, stage: str) -> StageParams:
    """A stage's parameters from a row that holds the resolved columns."""
    return StageParams(**{name: row[f"{stage}_{name}"] for name in PARAMS[stage]})


def cell(value: Any) -> Any:
    """One numpy cell as a plain Python value; null and NaN (of any float width) become None."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value
