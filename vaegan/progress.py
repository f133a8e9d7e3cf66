"""Training progress for people: a bar on a terminal, plain log lines in a log file.

Under a scheduler the output goes to a file, where a progress bar's redraws become thousands of
carriage-return updates. :class:`Progress` draws a tqdm bar when stderr is a terminal and otherwise
logs one line at a log interval at most every ``every_seconds`` (the metrics are read only at log
intervals, so this costs no host sync), plus the last step:

    step 1200/18740 (6.4%) epoch 1 | 512 images/s | g/total 0.231 d/total 1.32 | elapsed 0:02:10, left 0:31:05

Example:
    >>> with Progress(total=100, initial=0, mode="log", every_seconds=0) as progress:  # doctest: +SKIP
    ...     progress.update(); progress.report(1, {"g/total": 0.5})
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Literal, Mapping, Optional

from tqdm.auto import tqdm

__all__ = ["Progress"]

logger = logging.getLogger(__name__)

# The metrics a progress line or the bar's postfix shows, when logged.
SHOWN = ("g/total", "d/total", "g/reconstruction", "g/kl")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0.0))))


class Progress:
    """A tqdm bar on a terminal, else a log line per ``every_seconds`` (see the module docstring).

    Args:
        total: Steps of the run.
        initial: Steps already taken (a resumed run).
        mode: ``"auto"`` (a bar when stderr is a terminal, else log lines), ``"bar"``, ``"log"`` or ``"off"``.
        every_seconds: Log mode: at most one line per this many seconds (0: every log interval).
        enabled: False on processes other than the local main one.
    """

    def __init__(self, total: int, initial: int, mode: Literal["auto", "bar", "log", "off"] = "auto",
                 every_seconds: float = 30.0, enabled: bool = True) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode if enabled else "off"
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
        elapsed, done = now - self._t0, step - self.initial
        left = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)"]
        if "epoch" in metrics:
            parts[0] += f" epoch {int(metrics['epoch'])}"
        if "images_per_sec" in metrics:
            parts.append(f"{metrics['images_per_sec']:.0f} images/s")
        if shown:
            parts.append(" ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        parts.append(f"elapsed {_clock(elapsed)}, left {_clock(left) if left == left else '?'}")
        logger.info(" | ".join(parts))


def _rate(metrics: Mapping[str, float]) -> Mapping[str, float]:
    return {"images_per_sec": metrics["images_per_sec"]} if "images_per_sec" in metrics else {}
