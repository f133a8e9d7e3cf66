"""Entry-point plugin registry: losses, adversarial objectives, discriminators, datasets.

vaegan's own parts are registered in its ``setup.cfg`` exactly like a third party's, so there is
one path for both. Listing reads installed metadata and imports nothing; loading a name imports
only that plugin.

Groups:
    ``vaegan.losses``          loss terms (:class:`vaegan.objective.LossTerm` subclasses)
    ``vaegan.adversarial``     GAN loss pairs (:class:`vaegan.objective.AdversarialLoss`)
    ``vaegan.discriminators``  discriminator networks (:class:`vaegan.discriminators.Discriminator`)
    ``vaegan.datasets``        dataset factories (:func:`vaegan.data.mnist` is an example)

Set ``VAEGAN_DISABLE_THIRD_PARTY_PLUGINS=1`` to load only plugins shipped by vaegan itself
(a plugin is code that runs in your process).

Example:
    >>> "mse" in available("vaegan.losses")
    True
    >>> load("vaegan.losses", "mse").__name__
    'MSELoss'
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Dict, List, Optional

from .errors import PluginError

__all__ = ["GROUPS", "PluginInfo", "available", "load", "load_all", "describe", "refresh", "register"]

logger = logging.getLogger(__name__)

GROUPS = ("vaegan.losses", "vaegan.adversarial", "vaegan.discriminators", "vaegan.datasets")
FIRST_PARTY = ("vaegan",)  # distributions whose plugins load even with third-party ones disabled
DISABLE_ENV = "VAEGAN_DISABLE_THIRD_PARTY_PLUGINS"

# Entry points added at run time (tests, notebooks): group -> name -> EntryPoint.
_EXTRA: Dict[str, Dict[str, metadata.EntryPoint]] = {}


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as ``vaegan plugins`` lists it."""

    name: str
    group: str
    value: str  # "module:attr"
    distribution: str
    status: str  # "ok", "not loaded", "disabled" or "error: ..."


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "(registered at run time)"


@functools.lru_cache(maxsize=None)
def _installed(group: str) -> Dict[str, metadata.EntryPoint]:
    # Reads the installed distributions' entry_points.txt; imports none of the plugins.
    found: Dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            warnings.warn(
                f"Plugin name '{ep.name}' in group '{group}' is registered twice "
                f"({_dist_name(found[ep.name])}: {found[ep.name].value}, {_dist_name(ep)}: {ep.value}); "
                "the first one wins. Uninstall one of the packages.",
                stacklevel=2,
            )
            continue
        found[ep.name] = ep
    return found


def _entry_points(group: str) -> Dict[str, metadata.EntryPoint]:
    if group not in GROUPS:
        raise PluginError(f"Unknown plugin group '{group}'. vaegan's groups are: {', '.join(GROUPS)}.")
    return {**_installed(group), **_EXTRA.get(group, {})}


def _third_party_disabled(ep: metadata.EntryPoint) -> bool:
    return os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes") and _dist_name(ep) not in FIRST_PARTY


def refresh() -> None:
    """Forget cached entry-point metadata (after ``pip install`` in a running process)."""
    _installed.cache_clear()
    _load_cached.cache_clear()


def register(group: str, name: str, value: str) -> None:
    """Register a plugin at run time, e.g. ``register("vaegan.losses", "mine", "pkg.mod:Cls")``.

    Installed packages should use entry points instead; this is for notebooks and tests.
    """
    _entry_points(group)  # validates the group
    _EXTRA.setdefault(group, {})[name] = metadata.EntryPoint(name=name, value=value, group=group)
    _load_cached.cache_clear()


def available(group: str) -> List[str]:
    """Sorted plugin names in ``group``, read from metadata without importing any plugin."""
    return sorted(_entry_points(group))


@functools.lru_cache(maxsize=None)
def _load_cached(group: str, name: str, value: str) -> Any:
    ep = _entry_points(group)[name]
    try:
        return ep.load()
    except Exception as exc:  # any import-time failure of third-party code becomes one clear error
        raise PluginError(
            f"Plugin '{name}' (group '{group}', {ep.value}, from distribution '{_dist_name(ep)}') "
            f"failed to load: {type(exc).__name__}: {exc}. Fix or reinstall that package, or choose "
            f"another plugin; installed names in this group: {', '.join(available(group))}."
        ) from exc


def load(group: str, name: str) -> Any:
    """Import and return the object registered as ``name`` in ``group``.

    Raises:
        PluginError: the name is unknown (the message lists the installed names), the plugin is
            disabled, or importing it fails (the message names plugin, distribution and cause).
    """
    eps = _entry_points(group)
    if name not in eps:
        kind = group.split(".", 1)[1]
        raise PluginError(
            f"No {kind} plugin named '{name}'. Installed in '{group}': {', '.join(sorted(eps)) or 'none'}. "
            "Check the spelling, or pip-install the package that provides it."
        )
    ep = eps[name]
    if _third_party_disabled(ep):
        raise PluginError(
            f"Plugin '{name}' comes from the third-party distribution '{_dist_name(ep)}', and "
            f"{DISABLE_ENV} is set, which limits loading to vaegan's own plugins. Unset it to allow it."
        )
    return _load_cached(group, name, ep.value)


def load_all(group: str) -> Dict[str, Any]:
    """Load every plugin in ``group``, warning about (and skipping) any that fails."""
    loaded = {}
    for name in available(group):
        try:
            loaded[name] = load(group, name)
        except PluginError as exc:
            warnings.warn(str(exc), stacklevel=2)
    return loaded


def describe(groups: Optional[List[str]] = None, check: bool = True) -> List[PluginInfo]:
    """Every plugin with its distribution and status; ``check`` imports each to report errors."""
    rows = []
    for group in groups or GROUPS:
        for name, ep in sorted(_entry_points(group).items()):
            if _third_party_disabled(ep):
                status = "disabled"
            elif not check:
                status = "not loaded"
            else:
                try:
                    load(group, name)
                    status = "ok"
                except PluginError as exc:
                    cause = exc.__cause__
                    status = f"error: {type(cause).__name__}: {cause}" if cause else f"error: {exc}"
            rows.append(PluginInfo(name, group, ep.value, _dist_name(ep), status))
    return rows
