"""The cost table the planner reads (costs_data/costs.yaml; not a preset), typed and checked like the run config.

Costs are measured per GPU kind. A kind is found in any case and as Ray or nvidia-smi spell it (`h100`,
`NVIDIA-H100-80GB-HBM3`). A kind without measured rows is costed from the nearest measured kind (by spec-sheet tensor
TFLOP/s), scaled by the ratio of those TFLOP/s, and marked as an estimate; a kind the table does not know at all is
costed conservatively -- from plan.gpu_tflops when given, else as the slowest GPU the table knows -- and marked so,
with the nearest known name suggested. A run corrects an estimate from its own timings (tasks/stream/ray/placing.py)."""

from __future__ import annotations

import difflib
import math
import re
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
    measured: bool = Field(True, description="false: worked out, not measured (a plan that uses it says so).")


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
    unknown: str = ""  # for a kind the table does not know: how it was costed instead

    @property
    def estimated(self) -> bool:
        return self.kind != self.measured_as

    @property
    def source(self) -> str:
        if not self.estimated:
            return f"the cost table ({self.kind})"
        if self.unknown:
            return f"the cost table's {self.measured_as} rows x {self.factor:.2f} (estimate: {self.unknown})"
        return f"the cost table's {self.measured_as} rows x {self.factor:.2f} (estimate from spec-sheet TFLOP/s)"


def _norm(kind: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", kind.upper())


class CostTable(Section):
    gpus: dict[str, Gpu]
    costs: dict[str, dict[str, dict[str, StageCost]]]  # measured GPU kind -> stage -> model source -> cost
    writers: dict[str, float] = Field(
        default_factory=dict, description="Images/s one writer encodes and writes, per image format (1024 px)."
    )
    assumed_tflops: float | None = Field(None, gt=0, description="plan.gpu_tflops: a kind the table does not know.")

    def known(self, kind: str) -> str | None:
        """The table's name for `kind`: as given, in any case, or inside a longer name as Ray or nvidia-smi spell it
        (`NVIDIA-H100-80GB-HBM3`: the longest known name in it); None when the table does not know it."""
        names = {_norm(k): k for k in self.gpus}
        norm = _norm(kind)
        if norm in names:
            return names[norm]
        inside = [n for n in names if n in norm]
        return names[max(inside, key=len)] if inside else None

    def suggest(self, kind: str) -> str | None:
        """The known name nearest to an unknown one (`H10` -> H100)."""
        close = difflib.get_close_matches(_norm(kind), [_norm(k) for k in self.gpus], n=1, cutoff=0.4)
        return next((k for k in self.gpus if close and _norm(k) == close[0]), None)

    def costed_as(self, kind: str) -> KindCosts:
        """Which measured rows cost `kind`, and the factor on their seconds."""
        name = self.known(kind)
        if name in self.costs:
            return KindCosts(name, name, 1.0, self.gpus[name].memory_gb)
        if name is None:  # not known: never the most optimistic figure
            slowest = min(self.gpus, key=lambda k: self.gpus[k].tflops)
            tf = self.assumed_tflops or self.gpus[slowest].tflops
            near = self.suggest(kind)
            how = (
                f"plan.gpu_tflops = {tf:g}"
                if self.assumed_tflops
                else f"as the slowest GPU the table knows, {slowest}: set plan.gpu_tflops"
            )
            unknown = f"{kind} is not in the table{f' (did you mean {near}?)' if near else ''}; costed {how}"
            nearest = min(self.costs, key=lambda k: abs(math.log(self.gpus[k].tflops / tf)))
            return KindCosts(kind, nearest, self.gpus[nearest].tflops / tf, None, unknown)
        tf = self.gpus[name].tflops
        nearest = min(self.costs, key=lambda k: abs(math.log(self.gpus[k].tflops / tf)))
        return KindCosts(name, nearest, self.gpus[nearest].tflops / tf, self.gpus[name].memory_gb)

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


def load_costs(path: str | Path | None = None, assumed_tflops: float | None = None) -> CostTable:
    """The cost table at `path` (a config's plan.costs), or the repository's when None; assumed_tflops: what a GPU
    kind the table does not know is costed from (plan.gpu_tflops)."""
    path = COSTS_FILE if path is None else path
    try:
        data = yaml.safe_load(Path(path).read_text())
        table = CostTable.model_validate({**data, "assumed_tflops": assumed_tflops})
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
