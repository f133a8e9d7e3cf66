"""Weights that change over training: warm-ups, delayed starts and cyclical annealing.

One frozen dataclass covers every schedule vaegan uses (loss weights, the KL warm-up, the adversarial
start), so a YAML file can write either a number or a mapping:

    weight: 0.5                                  # constant
    weight: {value: 1.0, warmup: 2000}           # linear warm-up over 2,000 steps
    weight: {value: 1.0, cycle: 4000, ramp: 0.5} # cyclical annealing (Fu et al. 2019)
    weight: {value: 0.1, start_fraction: 0.25}   # off for the first quarter of training

Steps are optimizer updates (not micro-batches), counted from 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """A weight as a function of the training step.

    The weight is 0 before ``start``; then it rises linearly from 0 to ``value`` over ``warmup``
    steps (or, when ``cycle`` > 0, rises over the first ``ramp`` fraction of every ``cycle`` steps
    and holds for the rest of the cycle).

    Args:
        value: The weight once warmed up.
        start: First step at which the weight is non-zero.
        start_fraction: Alternative to ``start``: a fraction of the total steps, resolved by
            :meth:`resolve` once the trainer knows the length of training.
        warmup: Steps of linear ramp after ``start`` (0: jump straight to ``value``).
        cycle: Length of a cyclical-annealing period in steps (0: no cycles).
        ramp: Fraction of each cycle spent ramping up, in (0, 1].

    Example:
        >>> Schedule(value=1.0, warmup=10)(5)
        0.5
    """

    value: float = 1.0
    start: int = 0
    start_fraction: Optional[float] = None
    warmup: int = 0
    cycle: int = 0
    ramp: float = 0.5

    def __post_init__(self) -> None:
        if not math.isfinite(self.value) or self.value < 0:
            raise ConfigError(
                f"A loss weight must be a finite number >= 0, got {self.value!r}. Negative weights "
                "would turn a loss into a reward; set the weight to 0 to switch a term off."
            )
        for name in ("start", "warmup", "cycle"):
            if getattr(self, name) < 0:
                raise ConfigError(f"Schedule field '{name}' must be >= 0, got {getattr(self, name)}.")
        if self.start_fraction is not None and not 0.0 <= self.start_fraction < 1.0:
            raise ConfigError(
                f"Schedule field 'start_fraction' must be in [0, 1), got {self.start_fraction}: it "
                "is the fraction of training after which the term switches on."
            )
        if not 0.0 < self.ramp <= 1.0:
            raise ConfigError(f"Schedule field 'ramp' must be in (0, 1], got {self.ramp}.")

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        """A schedule that is ``value`` at every step."""
        return cls(value=float(value))

    @classmethod
    def normalize_config(cls, value: Any, path: str) -> Any:
        """A config may give a weight as a plain number: ``weight: 0.5`` is ``{value: 0.5}``."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"value": value}
        return value

    def resolve(self, total_steps: int) -> "Schedule":
        """Return a copy whose ``start_fraction`` is turned into a step count."""
        if self.start_fraction is None:
            return self
        start = int(round(self.start_fraction * total_steps))
        return Schedule(self.value, start, None, self.warmup, self.cycle, self.ramp)

    def __call__(self, step: int) -> float:
        if self.start_fraction is not None:
            raise RuntimeError("Schedule.resolve(total_steps) must be called before use.")
        if step < self.start:
            return 0.0
        t = step - self.start
        if self.cycle > 0:
            rise = max(1.0, self.ramp * self.cycle)
            return self.value * min(1.0, (t % self.cycle) / rise)
        if self.warmup > 0:
            return self.value * min(1.0, t / self.warmup)
        return self.value
