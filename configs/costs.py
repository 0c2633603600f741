"""The cost table the planner reads (costs_data/costs.yaml; not a preset), typed and checked like the run config."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from .loader import ConfigError
from .schema import STAGES, Section

COSTS_FILE = Path(__file__).parent / "costs_data" / "costs.yaml"


class StageCost(Section):
    batch_size: int = Field(ge=1, le=1024, description="Batch the figure was measured at.")
    seconds_per_image: float = Field(gt=0, description="Seconds per image at that batch.")
    weights_gb: float = Field(ge=0, description="The model's weights on the GPU.")
    activations_gb: float = Field(ge=0, description="Peak memory above the weights at that batch.")


class Gpu(Section):
    memory_gb: float = Field(gt=0)


class CostTable(Section):
    gpus: dict[str, Gpu]
    costs: dict[str, dict[str, dict[str, StageCost]]]  # GPU kind -> stage -> model source -> cost
    writers: dict[str, float] = Field(
        default_factory=dict, description="Images/s one writer encodes and writes, per image format (1024 px)."
    )

    def cost(self, kind: str, stage: str, source: str) -> StageCost:
        if kind not in self.costs:
            raise ConfigError(f"the cost table has no GPU kind {kind!r}; it has {sorted(self.costs)}")
        found = self.costs[kind].get(stage, {}).get(source)
        if found is None:
            raise ConfigError(
                f"the cost table has no cost for {stage} model {source!r} on {kind}; measure it "
                f"(benchmarks/gpu_smoke.py) and add it to {COSTS_FILE.name}, or set the stages' placement by hand"
            )
        return found


def load_costs(path: str | Path | None = None) -> CostTable:
    """The cost table at `path` (a config's plan.costs), or the repository's when None."""
    path = COSTS_FILE if path is None else path
    try:
        table = CostTable.model_validate(yaml.safe_load(Path(path).read_text()))
    except ValidationError as e:
        raise ConfigError(f"cost table {str(path)!r}: {e}") from None
    for kind, stages in table.costs.items():
        unknown = sorted(set(stages) - set(STAGES))
        if unknown or kind not in table.gpus:
            raise ConfigError(
                f"cost table {str(path)!r}: GPU kind {kind!r} needs an entry under gpus, and stages among "
                f"{list(STAGES)} (unknown: {unknown})"
            )
    return table
