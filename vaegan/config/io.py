"""Configuration I/O: YAML files and dotted ``key=value`` overrides, turned into an
:class:`~vaegan.config.ExperimentConfig` by the typed conversion of :mod:`.convert`.

Example:
    >>> cfg = load_config(None, ["train.batch_size=32", "model.options.latent_dim=8"])
    >>> cfg.train.batch_size, dict(cfg.model.options)
    (32, {'latent_dim': 8})
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ..errors import ConfigError
from .convert import from_dict, to_dict
from .schema import ExperimentConfig

__all__ = ["parse_yaml", "from_dict", "to_dict", "load_config", "apply_overrides"]


class _AliasRefused(yaml.YAMLError):
    pass


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats: only true/false are booleans (so
    ``mixed_precision: no`` stays "no"), and ``1e-3`` is a number, not a string; aliases refused.

    Why aliases are refused: the safe loader still expands them, and ten lines of nested aliases (a "billion
    laughs") expand to gigabytes over minutes. No vaegan config needs them.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(
                f"it uses the alias *{event.anchor} (line {event.start_mark.line + 1}); vaegan refuses YAML aliases "
                "and anchors, since a few lines of them can expand to gigabytes. Write the values out instead")
        return super().compose_node(parent, index)


_YAMLLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def parse_yaml(text: str, what: str = "The text") -> Any:
    """Parse YAML safely (no object construction, no aliases) with YAML 1.2 booleans.

    Args:
        text: The YAML.
        what: What the text is, for the error ("Config file 'a.yaml'", "Override 'x=y': the value").

    Raises:
        ConfigError: not valid YAML, a tag (``!!python/...``) or an alias, in one paragraph.

    Example:
        >>> parse_yaml("precision: no\\nlr: 1e-3")
        {'precision': 'no', 'lr': 0.001}
    """
    try:
        return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - _YAMLLoader is a SafeLoader
    except _AliasRefused as exc:
        raise ConfigError(f"{what} is refused: {exc}.") from None
    except yaml.YAMLError as exc:  # PyYAML's messages span lines (marks, carets): one paragraph here
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(exc).split())}") from None


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML file (or start from defaults) and apply ``key=value`` overrides.

    Args:
        path: A YAML file with any subset of the :class:`ExperimentConfig` keys, or None.
        overrides: Dotted assignments such as ``"train.batch_size=128"``; values are parsed as YAML.

    Raises:
        ConfigError: unreadable file, unknown key or wrong type.

    Example:
        >>> load_config("recipes/configs/vaegan_mnist.yaml", ["train.epochs=5"]).train.epochs  # doctest: +SKIP
        5
    """
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{p}' does not exist. Pass the path of a YAML file, "
                              "for example recipes/configs/vaegan_mnist.yaml.")
        data = parse_yaml(p.read_text(), f"Config file '{p}'") or {}
    # The file's own spellings are normalised before the defaults go under it, so an old key is read as
    # the file meant it; then overrides apply on top of the defaults, so `losses.1.weight=0.5` works even
    # when the file does not spell the list out. Mappings in the file replace only the keys they name.
    merged = _deep_merge(to_dict(ExperimentConfig()), _normalized(ExperimentConfig, data, ""))
    return from_dict(ExperimentConfig, _merge_overrides(merged, overrides))


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Return a new config with dotted ``key=value`` overrides applied (see :func:`load_config`).

    Overrides apply in order. Setting a plugin's ``name`` to another plugin (``model.name=mlp``,
    ``discriminator.name=patchgan``) empties its ``options``, which belonged to the previous plugin; set
    options after the name.

    Example:
        >>> apply_overrides(ExperimentConfig(), ["optim_g.lr=1e-3"]).optim_g.lr
        0.001
    """
    return from_dict(ExperimentConfig, _merge_overrides(to_dict(config), overrides))


def _normalized(cls: Any, data: Any, path: str) -> Any:
    """``data`` with every section's ``normalize_config`` applied, recursively (plain data out)."""
    if not dataclasses.is_dataclass(cls):
        return data
    normalize = getattr(cls, "normalize_config", None)
    if normalize is not None:
        data = normalize(data, path or cls.__name__)
    if not isinstance(data, Mapping):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for name, value in data.items():
        tp = hints.get(name)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
            tp = args[0]  # Optional[section]
        sub = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(tp):
            out[name] = _normalized(tp, value, sub)
        elif typing.get_origin(tp) in (tuple, Tuple) and isinstance(value, (list, tuple)):
            item = typing.get_args(tp)[0]
            out[name] = [_normalized(item, v, f"{sub}[{i}]") for i, v in enumerate(value)]
    return out


def _deep_merge(base: Any, data: Any) -> Any:
    """``data`` on top of ``base``: mappings merge key by key, anything else replaces."""
    if isinstance(base, Mapping) and isinstance(data, Mapping):
        merged = dict(base)
        for key, value in data.items():
            merged[key] = _deep_merge(base[key], value) if key in base else value
        return merged
    return data


def _merge_overrides(data: Any, overrides: Sequence[str]) -> dict:
    if not isinstance(data, Mapping):
        raise ConfigError(f"The config must be a mapping of sections, got {data!r}.")
    data = to_dict(data)  # deep copy into plain containers
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override '{item}' must look like section.key=value, e.g. train.epochs=5.")
        value = parse_yaml(raw, f"Override '{item}': the value") if raw != "" else None
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_index(part, node, key)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"Override '{item}': '{where}' is a value, not a section; set it with {where}=VALUE.")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key)] = value
        else:
            if last == "name" and isinstance(node.get("options"), Mapping) and node.get("name") != value:
                # Options belong to the plugin they were written for: choosing another plugin starts its
                # options afresh (later overrides may set them), as choosing a config group does in Hydra.
                node["options"] = {}
            node[last] = value
    return data


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"Override '{key}': '{part}' must be an index below {len(node)}.")
    return int(part)
