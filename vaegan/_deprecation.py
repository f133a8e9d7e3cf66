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

__all__ = ["deprecated_names", "warn_deprecated", "MOVED", "REMOVED_IN"]

# The release that removes every old name registered here.
REMOVED_IN = "0.6"
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
        warn_deprecated(f"{module}.{name} is deprecated; import it from {target} ({target}.{attr}).", stacklevel=2)
        return getattr(importlib.import_module(target), attr)

    return __getattr__


def warn_deprecated(message: str, stacklevel: int = 2) -> None:
    """Warn that an old form still works, naming the new one (``message``) and the release that removes it.

    Args:
        message: What is deprecated and what to use instead ("X is deprecated; use Y.").
        stacklevel: As for :func:`warnings.warn`, counted from the caller of this function.

    Example:
        >>> warn_deprecated("vaegan.build_model(config) is deprecated; use vaegan.build_generator(config.model).")  # doctest: +SKIP
    """
    warnings.warn(f"{message} The old form will be removed in vaegan {REMOVED_IN}.", DeprecationWarning,
                  stacklevel=stacklevel + 1)
