"""IF's named timestep schedules, as diffusers ships them."""

from __future__ import annotations

from diffusers.pipelines.deepfloyd_if import timesteps as _if_timesteps


def schedule(name: str) -> list[int]:
    try:
        return list(getattr(_if_timesteps, f"{name}_timesteps"))
    except AttributeError:
        known = sorted(n.removesuffix("_timesteps") for n in dir(_if_timesteps) if n.endswith("_timesteps"))
        raise ValueError(f"timestep schedule {name!r} is not one of {known}") from None
