"""Entry-point plugin registry: generators, losses, adversarial objectives, discriminators, datasets, samplers.

vaegan's own parts are registered in its ``setup.cfg`` exactly like a third party's, so there is
one path for both. Listing reads installed metadata and imports nothing; loading a name imports
only that plugin.

Groups (the contracts are in :mod:`vaegan.api`):
    ``vaegan.generators``      VAEs (:class:`vaegan.api.VAE` subclasses)
    ``vaegan.losses``          loss terms (:class:`vaegan.api.LossTerm` subclasses)
    ``vaegan.adversarial``     GAN loss pairs (:class:`vaegan.api.AdversarialLoss`)
    ``vaegan.discriminators``  discriminator networks (:class:`vaegan.api.Discriminator`)
    ``vaegan.datasets``        dataset factories (:class:`vaegan.api.DatasetFactory`)
    ``vaegan.samplers``        latent samplers (:class:`vaegan.api.LatentSampler` subclasses)

:func:`build_plugin` is the one way a plugin is constructed from a config's name and options.

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
import importlib
import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Dict, List, Mapping, Optional

from .errors import ConfigError, PluginError, VaeganError, did_you_mean

__all__ = ["GROUPS", "PluginInfo", "available", "load", "load_all", "describe", "refresh", "register",
           "build_plugin", "name_of"]

logger = logging.getLogger(__name__)

GROUPS = ("vaegan.generators", "vaegan.losses", "vaegan.adversarial", "vaegan.discriminators", "vaegan.datasets",
          "vaegan.samplers")
# What a plugin of each group must build ("module:class", imported only to check: the registry loads no torch).
# Datasets are duck-typed instead (map-style or a stream; vaegan.data.build_dataset checks them).
BASES = {"vaegan.generators": "vaegan.api:VAE", "vaegan.losses": "vaegan.api:LossTerm",
         "vaegan.adversarial": "vaegan.api:AdversarialLoss", "vaegan.discriminators": "vaegan.api:Discriminator",
         "vaegan.samplers": "vaegan.api:LatentSampler"}
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
    status: str  # "ok", "not loaded", "disabled", "needs ..." (see describe) or "error: ..."


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
            f"No {kind} plugin named '{name}'.{did_you_mean([name], eps)} Installed in '{group}': "
            f"{', '.join(sorted(eps)) or 'none'}. "
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


def name_of(group: str, obj: Any) -> Optional[str]:
    """The name under which ``obj`` (a class or function) is registered in ``group``, or None.

    Compares entry-point values (``module:qualname``) with the object's own; imports nothing.

    Example:
        >>> from vaegan.losses.kl import KLDivergence
        >>> name_of("vaegan.losses", KLDivergence)
        'kl'
    """
    value = f"{obj.__module__}:{obj.__qualname__}"
    return next((name for name, ep in sorted(_entry_points(group).items()) if ep.value == value), None)


def build_plugin(group: str, name: str, options: Mapping[str, Any],
                 optional_context: Optional[Mapping[str, Any]] = None, **context: Any) -> Any:
    """Load plugin ``name`` from ``group`` and call it with ``context`` and ``options`` as keywords.

    ``context`` is what vaegan always passes in this group (``image_shape`` for a discriminator, say);
    ``optional_context`` entries go only to plugins whose signature names them, so a loss term can
    check itself against the images before training starts. The keywords are checked against the
    plugin's signature first, so a misspelt option fails before anything is built.

    Raises:
        PluginError: unknown, disabled or broken plugin, or one that built something other than its group's
            base class (:data:`BASES`).
        ConfigError: an option the plugin does not accept, or a value it rejects (``ValueError`` or
            ``TypeError`` from its constructor), naming the plugin and its signature.

    Example:
        >>> build_plugin("vaegan.losses", "kl", {"free_bits": 0.5}).free_bits
        0.5
    """
    factory = load(group, name)
    kwargs = {**context, **dict(options)}
    try:
        signature: Optional[inspect.Signature] = inspect.signature(factory)
    except ValueError:  # no signature available (a C extension): let the call decide
        signature = None
    if signature is not None:
        for key, value in (optional_context or {}).items():
            if key in signature.parameters and key not in kwargs:
                kwargs[key] = value
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            accepted = [p for p in signature.parameters if p not in context]
            raise ConfigError(
                f"Plugin '{name}' ({group}) cannot take options {sorted(options)}: {exc}."
                f"{did_you_mean([k for k in options if k not in signature.parameters], accepted)} "
                f"Its signature is {name}{signature}."
            ) from None
    try:
        built = factory(**kwargs)
    except VaeganError:  # already one paragraph that says what to do (a DataError from a dataset, say)
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Plugin '{name}' ({group}) rejected its options {dict(options)}: {exc}") from exc
    _check_base(group, name, built)
    return built


def _check_base(group: str, name: str, built: Any) -> None:
    """Refuse what a plugin built when it is not its group's base class (:data:`BASES`)."""
    if group not in BASES:
        return
    module, _, attr = BASES[group].partition(":")
    base = getattr(importlib.import_module(module), attr)
    if not isinstance(built, base):
        raise PluginError(
            f"Plugin '{name}' ({group}) built a {type(built).__name__}, not a {module}.{attr}: a {group} plugin must "
            f"subclass {module}.{attr} (docs/plugins.md). Fix the plugin, or choose another.")


def describe(groups: Optional[List[str]] = None, check: bool = True) -> List[PluginInfo]:
    """Every plugin with its distribution and status; ``check`` imports each to report errors.

    A plugin that loads but cannot run here with its default options says so through an optional
    ``missing_resources()`` (a function or classmethod of the registered object) returning what is missing and
    the fix ("weights: put alexnet-owt-7be5be79.pth in ..."), or None; its status is then "needs ..."."""
    rows = []
    for group in groups or GROUPS:
        for name, ep in sorted(_entry_points(group).items()):
            if _third_party_disabled(ep):
                status = "disabled"
            elif not check:
                status = "not loaded"
            else:
                try:
                    status = _readiness(load(group, name))
                except PluginError as exc:
                    cause = exc.__cause__
                    status = f"error: {type(cause).__name__}: {cause}" if cause else f"error: {exc}"
            rows.append(PluginInfo(name, group, ep.value, _dist_name(ep), status))
    return rows


def _readiness(plugin: Any) -> str:
    """"ok", or "needs ..." from the plugin's optional ``missing_resources()`` hook (see :func:`describe`)."""
    hook = getattr(plugin, "missing_resources", None)
    if not callable(hook):
        return "ok"
    try:
        missing = hook()
    except Exception as exc:  # noqa: BLE001 - a third-party hook's bug must not hide the other plugins
        return f"error: missing_resources() raised {type(exc).__name__}: {exc}"
    return f"needs {missing}" if missing else "ok"
