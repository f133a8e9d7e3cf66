"""Parsers for config values that have a human spelling: durations (``23:30:00``) and signal names (``USR1``).

Both raise :class:`~vaegan.errors.ConfigError` naming the key, so a typo in a job script is refused
before any work starts.

Example:
    >>> parse_duration("1-00:30:00", "train.max_time")
    88200.0
    >>> int(parse_signal("USR1", "train.warning_signal"))
    10
"""

from __future__ import annotations

import math
import re
import signal
from typing import Union

from ..errors import ConfigError

__all__ = ["parse_duration", "parse_signal"]

# SLURM's --time spellings that carry a clock: [D-]HH:MM:SS, [D-]HH:MM, MM:SS, and D-HH.
_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_duration(value: Union[int, float, str], key: str) -> float:
    """Seconds in ``value``: a number of seconds, or a clock ``HH:MM:SS`` / ``D-HH:MM:SS`` (SLURM's form).

    ``"90"`` and ``90`` are 90 seconds; ``"45:00"`` is 45 minutes (MM:SS); ``"2-00"`` is two days.

    Raises:
        ConfigError: not a positive, finite duration in one of those forms.
    """
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            match = _CLOCK.match(text)
            if match and (":" in text or "-" in text):
                days, a, b, c = (int(g) if g is not None else None for g in match.groups())
                if days is not None and b is None:  # D-HH
                    h, m, s = a, 0, 0
                elif c is not None:  # [D-]HH:MM:SS
                    h, m, s = a, b, c
                elif days is not None:  # D-HH:MM
                    h, m, s = a, b, 0
                else:  # MM:SS
                    h, m, s = 0, a, b
                if m < 60 and s < 60:
                    seconds = float(((days or 0) * 24 + h) * 3600 + m * 60 + s)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"'{key}' must be a duration: a number of seconds (e.g. 84600) or a clock HH:MM:SS / D-HH:MM:SS "
            f"(e.g. 23:30:00 or 1-12:00:00), greater than zero; got {value!r}.")
    return seconds


def parse_signal(value: Union[int, str], key: str) -> signal.Signals:
    """The signal named by ``value``: ``"USR1"``, ``"SIGUSR1"`` or its number.

    Raises:
        ConfigError: no such signal on this platform, or one a process cannot catch (KILL, STOP).
    """
    text = str(value).strip().upper()
    try:
        sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG")
                                                                               else f"SIG{text}"]
    except (KeyError, ValueError):
        sig = None
    if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ConfigError(
            f"'{key}' must name a signal a process can catch, such as USR1, USR2, TERM or HUP (as in "
            f"`#SBATCH --signal=USR1@90`), got {value!r}.")
    return sig
