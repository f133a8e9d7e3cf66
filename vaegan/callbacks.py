"""Callbacks: the public hooks of the training loop, for benchmarks, tests and users.

Subclass :class:`Callback`, override the hooks you need, and pass instances to
:func:`vaegan.build_trainer` (``callbacks=[...]``). Hooks run on every process, in the order the
callbacks were given; they see the :class:`~vaegan.trainer.Trainer` (its ``state``, ``train_step``,
``accelerator``) and may call :meth:`~vaegan.trainer.Trainer.stop`. A step's metrics are device
tensors: reading one on the host waits for the device, so read them in :meth:`Callback.on_log`, where
the trainer has already read them, unless you mean to.

Example:
    >>> import time
    >>> class StopAfter(Callback):
    ...     def __init__(self, seconds: float) -> None:
    ...         self.deadline = time.perf_counter() + seconds
    ...     def on_step_end(self, trainer, output) -> None:
    ...         if time.perf_counter() > self.deadline:
    ...             trainer.stop()  # final/ is still written
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

from torch import Tensor

if TYPE_CHECKING:  # imported for annotations only: the trainer imports this module
    from .step import StepOutput
    from .trainer import Trainer

__all__ = ["Callback", "CallbackList"]


class Callback:
    """Base class of training-loop callbacks; every hook does nothing unless overridden."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """After a resume (if any) and the tracker start, before the first batch."""

    def on_batch_start(self, trainer: "Trainer", batch: Tensor) -> None:
        """Before the step runs on a micro-batch (B, C, H, W)."""

    def on_batch_end(self, trainer: "Trainer", output: Optional["StepOutput"]) -> None:
        """After the step ran on a micro-batch; ``output`` is None mid-accumulation."""

    def on_step_end(self, trainer: "Trainer", output: "StepOutput") -> None:
        """After an optimizer step of both players and the loop's logging, images, checkpoint and
        evaluation for it (``trainer.state.step`` counts it already)."""

    def on_log(self, trainer: "Trainer", metrics: Dict[str, float]) -> None:
        """At a log interval, with the metrics just written to ``metrics.jsonl`` and the trackers."""

    def on_train_end(self, trainer: "Trainer", final_dir: Any) -> None:
        """After ``final/`` is written."""


class CallbackList(Callback):
    """Calls each hook of several callbacks in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be vaegan.callbacks.Callback instances, got {type(cb).__name__}")

    def on_train_start(self, trainer: "Trainer") -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_batch_start(self, trainer: "Trainer", batch: Tensor) -> None:
        for cb in self.callbacks:
            cb.on_batch_start(trainer, batch)

    def on_batch_end(self, trainer: "Trainer", output: Optional["StepOutput"]) -> None:
        for cb in self.callbacks:
            cb.on_batch_end(trainer, output)

    def on_step_end(self, trainer: "Trainer", output: "StepOutput") -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, output)

    def on_log(self, trainer: "Trainer", metrics: Dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(trainer, metrics)

    def on_train_end(self, trainer: "Trainer", final_dir: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer, final_dir)
