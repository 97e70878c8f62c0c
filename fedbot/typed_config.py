"""Typed dataclass configs from plain mappings (TOML files, Flower run configs), and back.

Keys are the field names with '-' for '_' (Flower's style). An unknown key or a value of the wrong
type raises `ConfigError` naming the key and where it came from; nothing is silently ignored.
Configs that fedbot writes itself (the fleet dry run's agent files, run configs) are built as
dataclasses and written with `write_toml`, so they pass the same checks as a person's.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import tomli_w

from fedbot.atomic_files import write_bytes_atomic


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and its source."""


def key_of(field_name: str) -> str:
    return field_name.replace("_", "-")


def from_mapping(cls, data: dict, source: str, prefix: str = ""):
    """Build dataclass `cls` from `data`; nested dataclass fields are TOML tables."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a table")
    hints = typing.get_type_hints(cls)
    known = {key_of(f.name): f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {prefix + key!r}; known keys: {', '.join(sorted(known))}")
        field = known[key]
        values[field.name] = _convert(hints[field.name], value, source, prefix + key)
    missing = [
        key
        for key, f in known.items()
        if key not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing key {prefix + missing[0]!r}")
    return cls(**values)


def _convert(kind, value, source: str, key: str):
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, source, key + ".")
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        if option is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if option is Path and isinstance(value, str):
            return Path(value)
        if dataclasses.is_dataclass(option) and isinstance(value, dict):  # an optional table
            return from_mapping(option, value, source, key + ".")
        if typing.get_origin(option) is dict and isinstance(value, dict):
            _, item = typing.get_args(option)
            return {k: _convert(item, v, source, f"{key}.{k}") for k, v in value.items()}
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        wrong_bool = isinstance(value, bool) and option is not bool  # bool is an int in Python
        if isinstance(option, type) and isinstance(value, option) and not wrong_bool:
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{source}: key {key!r} must be {names}, got {value!r}")


def to_mapping(config) -> dict:
    """What `from_mapping` reads back as `config`: '-' keys, paths as strings, tuples as lists, and
    fields that are None left out (TOML has no null)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return to_mapping(value)
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {
        key_of(f.name): plain(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.init and getattr(config, f.name) is not None
    }


def write_toml(path: Path, config) -> None:
    """Write dataclass `config` as a TOML file, atomically."""
    write_bytes_atomic(path, tomli_w.dumps(to_mapping(config)).encode())


def changed_keys(config) -> str:
    """The fields of `config` that differ from their defaults, as Flower's `--run-config` string
    ("key=value ...", values in TOML)."""
    defaults = type(config)()
    changed = {key: value for key, value in to_mapping(config).items() if value != to_mapping(defaults).get(key)}
    return " ".join(tomli_w.dumps({key: value}).strip().replace(" = ", "=", 1) for key, value in changed.items())
