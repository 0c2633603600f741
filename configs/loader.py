"""Load a preset, apply `key=value` overrides and validate, with errors that name key, value and expectation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .schema import CascadeConfig

PRESET_DIR = Path(__file__).parent


class ConfigError(ValueError):
    """A preset or override that does not fit the schema."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(preset: str | Path) -> tuple[str, dict[str, Any]]:
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {str(preset)!r}: expected one of {preset_names()} or a path to a .yaml file"
            )
    elif not path.is_file():
        raise ConfigError(f"preset file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    data.setdefault("preset", path.stem)
    return str(path), data


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value, e.g. stage_1.steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def override_keys(overrides: Iterable[str]) -> frozenset[str]:
    """The dotted keys a list of `key=value` overrides sets (what the user asked for explicitly)."""
    return frozenset(o.partition("=")[0].strip() for o in overrides)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`stage_1.steps`) in a nested dict; values given as text are parsed as YAML scalars."""
    items = overrides.items() if isinstance(overrides, Mapping) else (_parse_override(o) for o in overrides)
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else key
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)!r}: {part!r} is a value ({child!r}), not a section")
            node = child
        node[path[-1]] = value
    return data


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<config>"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r} (value {value!r}); expected one of {_known_keys(model, err['loc'][:-1])}"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    if err["type"] == "model_type":  # a section given a value: --set stage_1=5
        keys = _known_keys(model, err["loc"])
        example = "steps" if "steps" in keys else keys[0]
        return (
            f"{key} = {value!r}: {key} is a section, not a value; set one of its keys, e.g. {key}.{example}=..., "
            f"from {keys}"
        )
    msg = str(err["msg"]).removeprefix("Value error, ")
    if isinstance(value, Mapping):  # a rule across keys (a model's validator): its message names them, not the dump
        return msg if key == "<config>" else f"{key}: {msg}"
    return f"{key} = {value!r}: {msg}"


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return sorted(model.model_fields)


def validate(data: Mapping[str, Any], origin: str = "config", overridden: Iterable[str] = ()) -> CascadeConfig:
    """The config, or a ConfigError naming each bad key where it was given: by an override (`--set`, the keys in
    `overridden`), else in `origin` (the preset file)."""
    try:
        return CascadeConfig.model_validate(dict(data))
    except ValidationError as e:
        set_keys = [k.split(".") for k in overridden]

        def where(err: dict[str, Any]) -> str:
            loc = [str(p) for p in err["loc"]]
            if not loc:  # a rule across the whole config
                return f"{origin} with --set" if set_keys else origin
            return "--set" if any(k[: len(loc)] == loc or loc[: len(k)] == k for k in set_keys) else origin

        problems = [(where(err), _describe(err, CascadeConfig)) for err in e.errors()]
        origins = list(dict.fromkeys(w for w, _ in problems))
        raise ConfigError("; ".join(f"{w}: " + "; ".join(m for x, m in problems if x == w) for w in origins)) from None


def load_config(preset: str | Path = "tiny", overrides: Iterable[str] | Mapping[str, Any] = ()) -> CascadeConfig:
    """Read a preset by name (`tiny`, `if-xl`, ...) or path, apply overrides, validate."""
    origin, data = _read_preset(preset)
    if isinstance(overrides, Mapping):  # keys dotted or already split, as apply_overrides takes them
        keys = [k if isinstance(k, str) else ".".join(k) for k in overrides]
    else:
        keys = list(override_keys(overrides))
    data = apply_overrides(data, overrides)
    return validate(data, origin, keys)
