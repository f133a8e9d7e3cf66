"""Typed conversion of plain data (YAML, JSON, keyword mappings) to the config's frozen dataclasses, and back.

The conversion is generic: it reads the type hints of the schema's dataclasses (:mod:`.schema`) and knows no
section by name. A dataclass may define ``normalize_config(value, path)`` to accept another spelling of itself
(a number for a schedule, vaegan 0.1's model keys); unknown keys (with the closest accepted one) and values of
the wrong type raise :class:`~vaegan.errors.ConfigError` naming the dotted key and what it accepts.

Hand-written because it is ~150 lines with no dependency, where pydantic or omegaconf would add a heavy
runtime dependency for a handful of dataclasses.

Example:
    >>> from vaegan.config import TrainConfig
    >>> from_dict(TrainConfig, {"epochs": 3}, "train").epochs
    3
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Any, Literal, Mapping, Tuple, Union

from ..errors import ConfigError, did_you_mean

__all__ = ["from_dict", "to_dict"]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return getattr(tp, "__name__", str(tp))


def _scalar(tp: Any, value: Any, path: str) -> Any:
    """bool, int, float and str, strictly (a YAML ``1`` is no boolean; ``2.0`` is an integer)."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{path}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{path}' must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"'{path}' must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in vaegan's schema, not user input


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1 and isinstance(value, Mapping):  # Optional[section]: name the nested key
            return _convert(candidates[0], value, path)
        for arg in candidates:
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"'{path}' must be {_describe(tp)}, got {value!r}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"'{path}' must be {_describe(tp)}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"'{path}' must be a list of {len(args)} items, got {value!r}.")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (collections.abc.Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be a mapping of option names to values, got {value!r}.")
        return types.MappingProxyType(dict(value))
    return _scalar(tp, value, path)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types.

    Args:
        cls: A schema dataclass (:class:`~vaegan.config.ExperimentConfig` or one of its sections).
        data: A mapping of its fields (or what its ``normalize_config`` accepts).
        path: The dotted key of ``data`` within the whole config, for messages.

    Raises:
        ConfigError: naming the offending key and what it accepts.

    Example:
        >>> from vaegan.config import TrainConfig
        >>> from_dict(TrainConfig, {"epochs": 3}, "train").epochs
        3
    """
    normalize = getattr(cls, "normalize_config", None)
    if normalize is not None:
        data = normalize(data, path or cls.__name__)
    where = f"'{path}'" if path else "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in {where}.{did_you_mean(unknown, names)} Allowed keys are: {', '.join(names)}. "
            "Check the spelling; vaegan never ignores a key it does not understand."
        )
    kwargs = {name: _convert(hints[name], data[name], f"{path}.{name}" if path else name)
              for name in names if name in data}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}. Required keys: {names}.") from None
    except ConfigError as exc:  # a value check in __post_init__: say where, if it does not
        message = str(exc)
        raise ConfigError(message if not path or path in message else f"'{path}': {message}") from None


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe data for a config dataclass (tuples become lists).

    Example:
        >>> from vaegan.config import ExperimentConfig
        >>> to_dict(ExperimentConfig())["model"]["image_size"]
        [28, 28]
    """
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
