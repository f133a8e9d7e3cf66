"""vaegan 0.1's ``model`` keys, carried forward: ``model.arch``, ``model.latent_dim`` and the other fields of the
two built-in architectures are options of the ``conv`` and ``mlp`` generator plugins now. Reading them (from a
config, as attributes, or as ``ModelConfig(...)`` keywords) still works, with a ``DeprecationWarning`` that
shows the new form. :mod:`vaegan.config.schema` wires these into :class:`~vaegan.config.ModelConfig`.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping

from .._deprecation import warn_deprecated
from ..errors import ConfigError

__all__ = ["LEGACY_MODEL_KEYS", "normalize_model", "legacy_model_attribute", "accept_legacy_keywords"]

# vaegan 0.1 kept the two built-in architectures' settings as fields of `model`; they are options of the
# `conv` and `mlp` generator plugins now. Old key -> option name, per architecture (a key the chosen
# architecture never read was ignored in 0.1, and is dropped).
LEGACY_MODEL_OPTIONS: Dict[str, Dict[str, str]] = {
    "conv": {"latent_dim": "latent_dim", "channels": "channels", "res_blocks": "res_blocks",
             "norm_groups": "norm_groups", "logvar_min": "logvar_min", "logvar_max": "logvar_max"},
    "mlp": {"latent_dim": "latent_dim", "mlp_hidden": "hidden", "logvar_min": "logvar_min",
            "logvar_max": "logvar_max"},
}
LEGACY_MODEL_KEYS = frozenset(k for table in LEGACY_MODEL_OPTIONS.values() for k in table) | {"arch"}



def normalize_model(cls: Any, value: Any, path: str) -> Any:
    """Carry vaegan 0.1's ``model`` keys (``arch``, ``latent_dim``, ``channels``, ...) into ``name`` and
    ``options`` of ``cls`` (:class:`~vaegan.config.ModelConfig`), warning with the new form. Keys given the
    old way win over the same option given the new way (they can only come from a later override)."""
    if not isinstance(value, Mapping) or not LEGACY_MODEL_KEYS & set(value):
        return value
    data = dict(value)
    arch = data.pop("arch", None)
    name = data.get("name")
    if arch is not None:
        if name not in (None, cls.name, arch):
            raise ConfigError(f"'{path}' sets both name: {name} and the old key arch: {arch}; keep only "
                              f"name (arch is vaegan 0.1's spelling of it).")
        name = arch
    name = name or cls.name
    table = LEGACY_MODEL_OPTIONS.get(name)
    options = dict(data.get("options") or {})
    previous = data.get("name")
    if arch is not None and previous not in (None, arch) and table is not None:
        # 0.1 ignored the fields the chosen architecture does not read (`arch: mlp` over a conv file).
        options = {k: v for k, v in options.items() if k in table.values()}
    moved = {}
    for key in sorted(LEGACY_MODEL_KEYS - {"arch"}):
        if key in data:
            old = data.pop(key)
            if table is None or key in table:  # a third-party generator gets the key as it was written
                moved[table[key] if table else key] = old
    options.update(moved)
    data.update(name=name, options=options)
    shown = ", ".join(f"{k}: {json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in moved.items())
    warn_deprecated(
        f"'{path}' uses vaegan 0.1's keys ({', '.join(sorted(LEGACY_MODEL_KEYS & set(value)))}); write "
        f"`{path}: {{name: {name}, options: {{{shown}}}}}` instead (the shared image_channels, image_size and "
        "output_range stay where they are).", stacklevel=3)  # the caller of ModelConfig.normalize_config
    return data


def legacy_model_attribute(self: Any, name: str) -> Any:
    """``config.latent_dim`` and the other 0.1 fields, read from ``options`` with a warning."""
    if name not in LEGACY_MODEL_KEYS:
        raise AttributeError(f"'ModelConfig' object has no attribute '{name}'")
    if name == "arch":
        warn_deprecated("ModelConfig.arch is deprecated; use ModelConfig.name.")
        return self.name
    key = LEGACY_MODEL_OPTIONS.get(self.name, {}).get(name, name)
    warn_deprecated(f"ModelConfig.{name} is deprecated; the generator's options hold it: config.options['{key}'].")
    if key not in self.options:
        raise AttributeError(f"This ModelConfig's options do not set '{key}' (the generator's default applies); "
                             "read it from the built generator's config.options instead.")
    return self.options[key]


def accept_legacy_keywords(init: Any) -> Any:
    """Let ``ModelConfig(latent_dim=8, arch="mlp", ...)`` (vaegan 0.1) build the new form, with a warning."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if LEGACY_MODEL_KEYS & set(kwargs):
            kwargs = dict(type(self).normalize_config(kwargs, "ModelConfig"))
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    return __init__
