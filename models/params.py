"""What shapes one diffusion stage's pass over a row: steps or a named schedule, guidance, noise level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ifbatch.configs.schema import SECTIONS

# The parameters each diffusion stage takes (and the manifest records per row), as its config section says them.
PARAMS: dict[str, tuple[str, ...]] = {stage: section.params for stage, section in SECTIONS.items() if section.params}
PARAM_TYPES: dict[str, type] = {"steps": int, "timesteps": str, "guidance_scale": float, "noise_level": int}
# What a prompt row may override, of the parameters its stage has (columns `stage_N_steps`,
# `stage_N_guidance_scale`, `stage_2_noise_level`, `stage_3_noise_level`)
ROW_OVERRIDES = ("steps", "guidance_scale", "noise_level")


@dataclass(frozen=True)
class StageParams:
    """One stage's effective parameters. With `timesteps` (a named IF schedule) set, `steps` is its length."""

    steps: int
    guidance_scale: float
    timesteps: str | None = None
    noise_level: int | None = None

    @classmethod
    def of(cls, section: Any) -> StageParams:
        """The config section's own values (what a row without overrides gets)."""
        timesteps = getattr(section, "timesteps", None)
        steps = len(_schedule(timesteps)) if timesteps else section.steps
        return cls(int(steps), float(section.guidance_scale), timesteps, getattr(section, "noise_level", None))

    def schedule_kwargs(self) -> dict[str, Any]:
        """The pipeline's keyword for the denoising schedule: a named schedule wins over a step count."""
        return {"timesteps": _schedule(self.timesteps)} if self.timesteps else {"num_inference_steps": self.steps}


def _schedule(name: str) -> list[int]:
    """Imported on use: the schedules live in diffusers, whose import costs seconds that the planner and the
    driver's row handling need not pay."""
    from .timesteps import schedule

    return schedule(name)
