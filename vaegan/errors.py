"""The exceptions vaegan raises for problems a user can fix.

Each carries one paragraph that says what is wrong and what to do about it. The CLI prints that
paragraph alone (no traceback) and exits with status 2.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["did_you_mean", "VaeganError", "ConfigError", "DataError", "PluginError", "CheckpointError", "TrainingDiverged",
           "TrainingStopped", "OutputError", "ResourceError"]


def did_you_mean(words: Iterable[str], choices: Iterable[str]) -> str:
    """" Did you mean 'epochs'?" for the close matches of ``words`` among ``choices`` (difflib's), else "".

    Example:
        >>> did_you_mean(["epoch"], ["epochs", "batch_size"])
        " Did you mean 'epochs'?"
    """
    choices = [str(c) for c in choices]
    found = {w: difflib.get_close_matches(str(w), choices, n=1, cutoff=0.6) for w in words}
    pairs = [(w, m[0]) for w, m in found.items() if m]
    if not pairs:
        return ""
    if len(pairs) == 1:
        return f" Did you mean '{pairs[0][1]}'?"
    return " Did you mean " + ", ".join(f"'{m}' for '{w}'" for w, m in pairs) + "?"


class VaeganError(Exception):
    """Base class: a problem in the user's input, environment or files, explained in one paragraph."""


class ConfigError(VaeganError, ValueError):
    """A configuration value or key that vaegan cannot use."""


class DataError(VaeganError, ValueError):
    """A dataset that is missing, empty, or does not fit the model."""


class PluginError(VaeganError, LookupError):
    """An entry-point plugin that is unknown or fails to load."""


class CheckpointError(VaeganError, OSError):
    """A checkpoint or saved model that is missing, corrupt or does not fit."""


class TrainingDiverged(VaeganError, RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, or non-finite weights to save."""


class TrainingStopped(SystemExit):
    """A run stopped early, with a checkpoint of the step it reached: a signal, a scheduler's warning, ``max_time``.

    A ``SystemExit``, so a script that does not catch it exits with :attr:`code` (128 + the signal's number,
    e.g. 143 for SIGTERM; 124 for ``train.max_time``, as ``timeout`` does); ``--resume auto`` continues.

    Attributes:
        code: The exit status.
        reason: What stopped the run, in words (``"stopped by SIGTERM"``, ``"max_time reached"``).
        step: The last step taken; its checkpoint is saved.
    """

    def __init__(self, code: int, reason: str, step: int) -> None:
        super().__init__(code)
        self.reason = reason
        self.step = step


class OutputError(VaeganError, OSError):
    """The output folder cannot take the run: a file in its place, read-only, too little space, a failed save."""


class ResourceError(VaeganError, RuntimeError):
    """The machine ran out of something the step needs (GPU or CPU memory); the last completed step is saved."""
