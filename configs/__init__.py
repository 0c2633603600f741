"""Run presets (YAML in this folder) and the loader that validates them against `schema.py`."""

from .loader import ConfigError, apply_overrides, load_config, preset_names
from .schema import CascadeConfig

__all__ = ["CascadeConfig", "ConfigError", "apply_overrides", "load_config", "preset_names"]
