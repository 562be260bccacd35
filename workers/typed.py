"""Typed loading: a YAML mapping becomes a frozen dataclass, or a ConfigError naming the path.

The rule of this module: it knows dataclasses and YAML values, nothing of poolgate's own
settings, so queues.yaml (workers/config.py) and every launcher's options dataclass use it and
it imports neither.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def _describe(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a nested section
        return build(tp, value, path)
    elif origin is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        if isinstance(value, list):  # a list of mappings, e.g. an ssh pool's hosts
            item = typing.get_args(tp)[0]
            return tuple(build(item, v, f"{path}[{i}]") for i, v in enumerate(value))
        raise ConfigError(f"{path}: expected a list of mappings, got "
                          f"{json.dumps(value, default=str)}")
    elif origin is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            return tuple(str(v) for v in value)
        raise ConfigError(f"{path}: expected a list of strings, got {json.dumps(value)}")
    elif origin in (dict, Mapping) or tp in (dict, Mapping):
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{path}: expected a mapping, got {json.dumps(value)}")
    else:
        return value
    raise ConfigError(f"{path}: expected {_describe(tp)}, got {json.dumps(value, default=str)}")


def build(cls: type[T], data: Any, path: str, **fixed: Any) -> T:
    """Build dataclass ``cls`` from a YAML mapping; unknown keys and bad types are ConfigErrors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {json.dumps(data, default=str)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = dict(fixed)
    for key, value in data.items():
        if key not in fields or key in fixed:
            close = difflib.get_close_matches(str(key), [f for f in fields if f not in fixed], 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            allowed = ", ".join(f for f in fields if f not in fixed)
            raise ConfigError(f"{path}.{key}: unknown key{hint} (allowed: {allowed})")
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except ValueError as exc:  # from a __post_init__, as "field: rule"
        raise ConfigError(f"{path}.{exc}") from exc
