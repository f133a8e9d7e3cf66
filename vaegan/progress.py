"""Progress for people: a bar on a terminal, plain log lines in a log file, for training and every long phase.

Under a scheduler the output goes to a file, where a progress bar's redraws become thousands of
carriage-return updates. :class:`Progress` (training) draws a tqdm bar when stderr is a terminal (or a
notebook runs the code) and otherwise logs one line at a log interval at most every ``every_seconds`` (the
metrics are read only at log intervals, so this costs no host sync), plus the last step:

    step 1200/18740 (6.4%) epoch 1 | 512 images/s | g/total 0.231 d/total 1.32 | elapsed 0:02:10, left 0:31:05

:class:`Phase` does the same for any other phase that takes long (encoding, a sampler's fit, evaluation,
scoring, decoding): quiet for its first few seconds, then a bar or a line such as

    encode: 2048/60000 img (3.4%) | 410 img/s | elapsed 0:00:05, left 0:02:21

The lines go through :mod:`logging` (logger ``vaegan.progress``) once the program has configured logging,
and straight to stderr while it has not, so a Python script or notebook shows them by default as
transformers and diffusers do. :func:`set_progress` (or the environment variable ``VAEGAN_PROGRESS``:
``auto``, ``bar``, ``log``, ``off``; ``VAEGAN_PROGRESS_SECONDS`` for the line interval) switches them for
the whole process; ``train.progress`` in a config for one training run.

Example:
    >>> with Phase("encode", total=1000, unit="img") as phase:  # doctest: +SKIP
    ...     for batch in batches:
    ...         phase.update(len(batch))
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from typing import Literal, Mapping, Optional

from tqdm.auto import tqdm

from .errors import ConfigError

__all__ = ["Progress", "Phase", "set_progress", "progress_mode", "emit", "local_main"]

logger = logging.getLogger(__name__)

Mode = Literal["auto", "bar", "log", "off"]
MODES = ("auto", "bar", "log", "off")
# A phase shows nothing for its first seconds: a short one (a test, a tiny dataset) stays silent.
QUIET_SECONDS = 5.0
# The process-wide choice of set_progress() ("mode", "every_seconds"), like logging's configuration: a user's
# switch for the whole program, not state a component passes around. Empty: the environment's, else auto.
_chosen: dict = {}


def set_progress(mode: Optional[Mode] = None, every_seconds: Optional[float] = None) -> None:
    """Choose how every phase of this process shows progress (training's ``train.progress: auto`` follows it).

    Args:
        mode: ``auto`` (a bar on a terminal or in a notebook, else log lines), ``bar``, ``log`` or ``off``;
            None keeps the current choice.
        every_seconds: Log lines at most this often (None keeps the current choice; default 30).

    Raises:
        ConfigError: an unknown mode or a negative interval.

    Example:
        >>> set_progress("off")  # a quiet script  # doctest: +SKIP
    """
    if mode is not None:
        _chosen["mode"] = _checked_mode(mode, "set_progress(mode=...)")
    if every_seconds is not None:
        if not every_seconds >= 0:
            raise ConfigError(f"set_progress(every_seconds=...) must be >= 0, got {every_seconds!r}.")
        _chosen["every_seconds"] = float(every_seconds)


def _checked_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}.")
    return mode


def progress_mode(mode: Optional[str] = None) -> str:
    """The mode a phase uses: ``mode`` unless it is None or ``auto``, else :func:`set_progress`'s, else
    ``VAEGAN_PROGRESS``'s, resolved to ``bar`` (stderr a terminal, or a notebook), ``log`` or ``off``."""
    if mode in (None, "auto"):
        mode = _chosen.get("mode") or _checked_mode(os.environ.get("VAEGAN_PROGRESS", "auto"), "VAEGAN_PROGRESS")
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() or _in_notebook() else "log"
    return mode


def _every_seconds(default: float) -> float:
    if "every_seconds" in _chosen:
        return _chosen["every_seconds"]
    raw = os.environ.get("VAEGAN_PROGRESS_SECONDS")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"VAEGAN_PROGRESS_SECONDS must be a number of seconds >= 0, got {raw!r}.")
    return value


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:  # noqa: BLE001 - an IPython without a running shell
        return False


def local_main() -> bool:
    """Whether this is the first process of its machine (``LOCAL_RANK`` 0, or no launcher): the one that shows
    progress, so that N processes of a run do not print every line N times."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def emit(message: str) -> None:
    """A progress line: through logging once the program has configured it, else to stderr (a plain script);
    nothing on processes other than the local main one (:func:`local_main`)."""
    if not local_main():
        return
    if logger.hasHandlers():
        logger.info(message)
    else:
        tqdm.write(message, file=sys.stderr)


# The metrics a progress line or the bar's postfix shows, when logged.
SHOWN = ("g/total", "d/total", "g/reconstruction", "g/kl")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0.0))))


def _timing(elapsed: float, done: float, remaining: Optional[float], bound: bool = False) -> str:
    """"elapsed 0:02:10, left 0:31:05" at the rate so far; no "left" when the total is unknown (``remaining``
    None), "left ?" before the first unit, "left at most" when the total is an upper bound."""
    text = f"elapsed {_clock(elapsed)}"
    if remaining is None:
        return text
    left = _clock(elapsed / done * remaining) if done > 0 else "?"
    return f"{text}, left {'at most ' if bound else ''}{left}"


class Progress:
    """A tqdm bar on a terminal, else a log line per ``every_seconds`` (see the module docstring).

    Args:
        total: Steps of the run.
        initial: Steps already taken (a resumed run).
        mode: ``"auto"`` (the process's choice, :func:`set_progress`; else a bar when stderr is a terminal or a
            notebook runs the code, log lines otherwise), ``"bar"``, ``"log"`` or ``"off"``.
        every_seconds: Log mode: at most one line per this many seconds (0: every log interval).
        enabled: False on processes other than the local main one.
    """

    def __init__(self, total: int, initial: int, mode: Mode = "auto", every_seconds: float = 30.0,
                 enabled: bool = True) -> None:
        self.mode = progress_mode(mode) if enabled else "off"
        self.total, self.initial, self.every_seconds = total, initial, every_seconds
        self._t0 = time.monotonic()
        self._last_line: Optional[float] = None
        self._bar = tqdm(total=total, initial=initial, desc="train") if self.mode == "bar" else None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, n: int = 1) -> None:
        """``n`` more steps taken (the bar moves; log lines wait for :meth:`report`)."""
        if self._bar is not None:
            self._bar.update(n)

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """A log interval's averaged metrics: the bar's postfix, or a log line when one is due."""
        shown = {k: metrics[k] for k in SHOWN if k in metrics}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in {**shown, **_rate(metrics)}.items()})
            return
        now = time.monotonic()
        due = self._last_line is None or now - self._last_line >= self.every_seconds or step >= self.total
        if self.mode != "log" or not due:
            return
        self._last_line = now
        parts = [f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)"]
        if "epoch" in metrics:
            parts[0] += f" epoch {int(metrics['epoch'])}"
        if "images_per_sec" in metrics:
            parts.append(f"{metrics['images_per_sec']:.0f} images/s")
        if shown:
            parts.append(" ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        parts.append(_timing(now - self._t0, step - self.initial, self.total - step))
        emit(" | ".join(parts))


class Phase:
    """The progress of one long phase (encoding, fitting, evaluating): see the module docstring.

    Silent for its first :data:`QUIET_SECONDS` (a short phase prints nothing); then a tqdm bar, or a log line
    at most every ``every_seconds`` with the rate and the time left, and a closing line with the time taken.

    Args:
        desc: What is done ("encode", "gmm fit"): the bar's label and each line's start.
        total: Units to do (None: unknown; the lines then give no time left).
        unit: What a unit is ("img", "iteration").
        mode: None (the process's choice, :func:`set_progress`), or ``auto`` / ``bar`` / ``log`` / ``off``.
        every_seconds: Log lines at most this often (None: the process's choice, default 30).
        enabled: False: no progress (processes other than the local main one never show any, :func:`local_main`).
        bound: ``total`` is an upper bound (EM stops when it converges): the time left is "at most".
        hint: Said with the first line (log mode): how to make the phase shorter, say.

    Example:
        >>> with Phase("decode", total=len(latents)) as phase:  # doctest: +SKIP
        ...     for chunk in latents.split(256):
        ...         phase.update(len(chunk))
    """

    def __init__(self, desc: str, total: Optional[int], unit: str = "img", *, mode: Optional[Mode] = None,
                 every_seconds: Optional[float] = None, enabled: bool = True, bound: bool = False,
                 hint: Optional[str] = None) -> None:
        self.desc, self.total, self.unit, self.bound, self.hint = desc, total, unit, bound, hint
        self.mode = progress_mode(mode) if enabled and local_main() else "off"
        self.every_seconds = _every_seconds(30.0) if every_seconds is None else every_seconds
        self.done = 0
        self._t0 = time.monotonic()
        self._last_line: Optional[float] = None
        # tqdm's delay keeps the bar hidden for a short phase, as the log lines are.
        self._bar = (tqdm(total=total, desc=desc, unit=unit, delay=min(QUIET_SECONDS, self.every_seconds),
                          file=sys.stderr) if self.mode == "bar" else None)

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.mode != "log":
            return
        now = time.monotonic()
        quiet = min(QUIET_SECONDS, self.every_seconds)
        if self._last_line is None:
            due = now - self._t0 >= quiet
        else:
            due = now - self._last_line >= self.every_seconds
        if due:
            first = self._last_line is None
            self._last_line = now
            emit(self._line(now) + (f" ({self.hint})" if first and self.hint else ""))

    def _line(self, now: float) -> str:
        elapsed = now - self._t0
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
                 + (f" ({100.0 * self.done / self.total:.1f}%)" if self.total else "")]
        if rate == rate:
            parts.append(f"{rate:.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s")
        parts.append(_timing(elapsed, self.done, self.total - self.done if self.total else None, self.bound))
        return " | ".join(parts)

    def close(self) -> None:
        """The bar closed, or (log mode, when any line was written) a last line with the time taken."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last_line is not None:
            self._last_line = None
            emit(f"{self.desc}: {self.done} {self.unit} in {_clock(time.monotonic() - self._t0)}")


def _rate(metrics: Mapping[str, float]) -> Mapping[str, float]:
    return {"images_per_sec": metrics["images_per_sec"]} if "images_per_sec" in metrics else {}
