"""The cost table the planner reads (costs_data/costs.yaml; not a preset), typed and checked like the run config.

Costs are measured per GPU kind. A kind without measured rows is costed from the nearest measured kind (by spec-sheet
tensor TFLOP/s), scaled by the ratio of those TFLOP/s, and marked as an estimate; a kind the table does not know at
all is costed as the nearest measured kind, unscaled, and marked so. A run corrects an estimate from its own timings
(tasks/stream/placing.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    memory_gb: float = Field(gt=0, description="Memory of one GPU (a node's own reading replaces it).")
    tflops: float = Field(gt=0, description="Dense fp16/bf16 tensor TFLOP/s from the spec sheet: scales estimates.")


@dataclass(frozen=True)
class KindCosts:
    """How a GPU kind is costed: from which measured kind, times what."""

    kind: str
    measured_as: str  # the kind whose rows are read
    factor: float  # seconds = measured seconds x factor
    memory_gb: float | None  # the table's (None: a kind it does not know)

    @property
    def estimated(self) -> bool:
        return self.kind != self.measured_as

    @property
    def source(self) -> str:
        if not self.estimated:
            return f"the cost table ({self.kind})"
        if self.memory_gb is None:
            return f"the cost table's {self.measured_as} rows (estimate: {self.kind} is not in the table)"
        return f"the cost table's {self.measured_as} rows x {self.factor:.2f} (estimate from spec-sheet TFLOP/s)"


class CostTable(Section):
    gpus: dict[str, Gpu]
    costs: dict[str, dict[str, dict[str, StageCost]]]  # measured GPU kind -> stage -> model source -> cost
    writers: dict[str, float] = Field(
        default_factory=dict, description="Images/s one writer encodes and writes, per image format (1024 px)."
    )

    def costed_as(self, kind: str) -> KindCosts:
        """Which measured rows cost `kind`, and the factor on their seconds."""
        if kind in self.costs:
            return KindCosts(kind, kind, 1.0, self.gpus[kind].memory_gb)
        if kind not in self.gpus:
            nearest = max(self.costs, key=lambda k: self.gpus[k].tflops)
            return KindCosts(kind, nearest, 1.0, None)
        tf = self.gpus[kind].tflops
        nearest = min(self.costs, key=lambda k: abs(math.log(self.gpus[k].tflops / tf)))
        return KindCosts(kind, nearest, self.gpus[nearest].tflops / tf, self.gpus[kind].memory_gb)

    def cost(self, kind: str, stage: str, source: str) -> StageCost:
        """The cost of `stage` run with model `source` on `kind` (scaled when `kind` is costed as another)."""
        how = self.costed_as(kind)
        found = self.costs[how.measured_as].get(stage, {}).get(source)
        if found is None:
            raise ConfigError(
                f"the cost table has no cost for {stage} model {source!r} on {how.measured_as}; measure it "
                f"(benchmarks/gpu_smoke.py) and add it to {COSTS_FILE.name}, or set the stages' placement by hand"
            )
        if how.factor == 1.0:
            return found
        return found.model_copy(update={"seconds_per_image": found.seconds_per_image * how.factor})


def load_costs(path: str | Path | None = None) -> CostTable:
    """The cost table at `path` (a config's plan.costs), or the repository's when None."""
    path = COSTS_FILE if path is None else path
    try:
        table = CostTable.model_validate(yaml.safe_load(Path(path).read_text()))
    except ValidationError as e:
        raise ConfigError(f"cost table {str(path)!r}: {e}") from None
    if not table.costs:
        raise ConfigError(f"cost table {str(path)!r}: no measured GPU kind under costs")
    for kind, stages in table.costs.items():
        unknown = sorted(set(stages) - set(STAGES))
        if unknown or kind not in table.gpus:
            raise ConfigError(
                f"cost table {str(path)!r}: GPU kind {kind!r} needs an entry under gpus, and stages among "
                f"{list(STAGES)} (unknown: {unknown})"
            )
    return table
