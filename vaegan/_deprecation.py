"""Old import paths that keep working with a ``DeprecationWarning`` naming the new one.

A module whose public names moved assigns ``__getattr__ = deprecated_names(__name__, {...})``: Python
calls a module's ``__getattr__`` only for names it does not define, so the moved names resolve (with
the warning) and everything else behaves as before. ``tests/test_deprecations.py`` imports every old
path listed in :data:`MOVED` and checks the warning and the object.

Example:
    >>> __getattr__ = deprecated_names("vaegan.objective", {"LossTerm": "vaegan.api:LossTerm"})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict, Mapping

__all__ = ["deprecated_names", "MOVED"]

MOVED: Dict[str, Dict[str, str]] = {}  # old module -> {name: "new.module:name"}, for the tests and docs


def deprecated_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves each moved name from its new home, with a warning.

    Args:
        module: The old module's ``__name__``.
        moved: Old name -> ``"new.module:new_name"``.
    """
    MOVED[module] = dict(moved)

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module '{module}' has no attribute '{name}'")
        target, _, attr = moved[name].partition(":")
        warnings.warn(f"{module}.{name} is deprecated; import it from {target} ({target}.{attr}). The old path "
                      "will be removed in a future release.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), attr)

    return __getattr__
