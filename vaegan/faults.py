"""Faults of the machine and the data: the output checked before the work, writes that fail cleanly, and a
data error or out-of-memory mid-run that saves the last completed step first (docs/reliability.md, "Faults
of the machine and the data").

- :func:`check_output`: before any data is read, the output folder must be a folder (or creatable),
  writable, and have room for what the run will write (:func:`output_estimate`); a shortfall is one
  paragraph, a close call a warning.
- :class:`Boundary`: the loop's counters and every random state a step draws from, as of the last completed
  optimizer step, so a step that fails half-way (out of memory, a vanished file) is saved as if it had
  never started, and ``--resume auto`` continues exactly.
- :class:`SoftWrites`: sample grids, ``metrics.jsonl``, ``eval.jsonl``: a write that fails warns once per
  kind and training goes on (the checkpoints and the final model are the writes worth stopping for).

Example:
    >>> check_output("outputs/run", output_estimate(cfg, model, disc))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Set, Union

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from .checkpointing import folder_bytes, list_checkpoints
from .files import mb
from .config import ExperimentConfig
from .errors import DataError, OutputError, ResourceError
from .files import dumps_json

__all__ = ["output_estimate", "check_output", "Boundary", "SoftWrites", "writing_final", "save_after_fault",
           "clean_data_error", "out_of_memory", "mb"]

logger = logging.getLogger(__name__)

GRIDS_AND_LOGS = 4 << 20  # sample grids, metrics and the model card: a few MB for a whole run


def _bytes(module: Optional[nn.Module]) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def output_estimate(config: ExperimentConfig, generator: nn.Module, discriminator: Optional[nn.Module]) -> Dict[str, int]:
    """Bytes the run will write: ``{"checkpoint", "final", "total"}``.

    A checkpoint holds each player's weights and Adam's two moments (3x, fp32), the EMA, RNG and counters;
    ``train.checkpoints_total_limit`` of them are kept and one more is written before the oldest goes.
    ``final/`` holds the EMA and raw generators and the discriminator.
    """
    g, d = _bytes(generator), _bytes(discriminator)
    ema = g if config.train.ema_decay is not None else 0
    checkpoint = 3 * (g + d) + ema + (64 << 10)
    final = g + ema + d + (1 << 20)
    total = checkpoint * (config.train.checkpoints_total_limit + 1) + final + GRIDS_AND_LOGS
    return {"checkpoint": checkpoint, "final": final, "total": total}


def check_output(output_dir: Union[str, Path], estimate: Dict[str, int], limit: int = 1) -> None:
    """Refuse an output folder that cannot take the run, before any data is read or anything is written.

    Args:
        output_dir: ``train.output_dir``.
        estimate: From :func:`output_estimate`.
        limit: ``train.checkpoints_total_limit`` (for the message).

    Raises:
        OutputError: a file where the folder should be, a folder that cannot be created or written (permissions,
            a read-only file system), or less free space than the estimate.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--output-dir '{path}' is a file, not a folder. Choose another --output-dir "
                          "(train.output_dir; it is created when missing) or move the file away.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--output-dir '{path}' cannot be created: '{existing}' is a file. Choose another "
                          "--output-dir (train.output_dir).")
    if not os.access(existing, os.W_OK | os.X_OK):  # also False on a read-only file system, even for root
        raise OutputError(f"--output-dir '{path}' cannot be written: '{existing}' is read-only (its permissions or "
                          "a read-only file system). Choose a folder you can write to with --output-dir "
                          "(train.output_dir). Nothing was written.")
    free = shutil.disk_usage(existing).free
    need = estimate["total"]
    what = (f"about {mb(need)}: {limit + 1} checkpoints of {mb(estimate['checkpoint'])} (one more is written before "
            f"the oldest of the {limit} kept is deleted), the final model ({mb(estimate['final'])}) and sample grids")
    if need > free:
        raise OutputError(f"The run needs {what}, but only {mb(free)} are free under '{existing}'. Free some space, "
                          "lower train.checkpoints_total_limit, or choose another --output-dir. Nothing was written.")
    if need > 0.8 * free:
        logger.warning("The run needs %s; only %s are free under '%s'. Other programs writing there could fill the "
                       "disk: a save that fails stops training with the last complete checkpoint kept.", what,
                       mb(free), existing)


class Boundary:
    """The training loop's state after the last completed optimizer step (see the module docstring): the
    counters, every random state, and the players' buffers (a spectral norm's power-iteration vectors, batch
    statistics), which a step's forward changes before its update.

    :meth:`take` costs a copy of the RNG states (a few kB, host only: no GPU sync) and one device copy per
    buffer (queued, no sync) per optimizer step.

    Args:
        modules: The modules whose buffers a failed step may have changed (both players).
    """

    def __init__(self, modules: Sequence[nn.Module] = ()) -> None:
        self.buffers = [b for m in modules for b in m.buffers()]
        self.saved = [b.detach().clone() for b in self.buffers]
        self.counters = (0, 0, 0)
        self.rng: tuple = ()

    def take(self, state: Any) -> "Boundary":
        """Remember ``state``'s counters (epoch, batch in epoch, images seen), the RNGs and the buffers."""
        self.counters = (state.epoch, state.batch_in_epoch, state.images_seen)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)
        with torch.no_grad():
            for saved, live in zip(self.saved, self.buffers):
                saved.copy_(live)
        return self

    def restore(self, state: Any) -> None:
        """Put everything back (the loop's ``state`` object and the buffers are changed in place)."""
        state.epoch, state.batch_in_epoch, state.images_seen = self.counters
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.rng[3] is not None:
            torch.cuda.set_rng_state_all(self.rng[3])
        with torch.no_grad():
            for saved, live in zip(self.saved, self.buffers):
                live.copy_(saved)


@contextlib.contextmanager
def writing_final(final: Path, checkpoints: Path) -> Iterator[None]:
    """Writes of ``final/``: if one fails (no space, an I/O error; torch's writer raises RuntimeError and
    safetensors' its SafetensorError), the half-written folder is removed and an :class:`OutputError` says how
    to write it again."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(final, ignore_errors=True)
        done = list_checkpoints(checkpoints)
        kept = (f"the checkpoint of the last step, {done[-1]} ({mb(folder_bytes(done[-1]))}), is complete" if done
                else "no checkpoint is complete")
        raise OutputError(
            f"Writing the final model to '{final}' failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"the half-written folder was removed and {kept}. Free some space, then run the same command with "
            "--resume auto: it finds training complete and writes final/ again.") from exc


class SoftWrites:
    """Writes training can go on without: a failure warns once per kind (:attr:`failed` names the kinds)."""

    def __init__(self) -> None:
        self.failed: Set[str] = set()

    def append_line(self, kind: str, path: Path, record: Mapping[str, Any]) -> None:
        """Append ``record`` to the JSON-lines log ``path`` (``metrics.jsonl``), warning once per ``kind``."""
        def write() -> None:
            with open(path, "a") as fh:
                fh.write(dumps_json(record) + "\n")  # a NaN metric is null: every JSON reader can read the log

        self(kind, write)

    def __call__(self, kind: str, write: Callable[[], Any]) -> None:
        try:
            write()
        except OSError as exc:
            if kind not in self.failed:
                logger.warning("Could not write the %s (%s); training goes on without it (checkpoints are still "
                               "saved, and a failed checkpoint would stop the run). Free some space or fix the "
                               "output folder.", kind, exc)
            self.failed.add(kind)


def clean_data_error(exc: DataError) -> str:
    """The one paragraph of a :class:`DataError`, also when a DataLoader worker raised it (the loader re-raises
    it with the worker's traceback in the message)."""
    text = str(exc)
    return text.rsplit(f"{type(exc).__name__}: ", 1)[-1].strip() if "Traceback" in text else text


def out_of_memory(exc: BaseException, config: ExperimentConfig, step: int, saved: str) -> ResourceError:
    """The one-paragraph error for ``torch.OutOfMemoryError`` at ``step`` (after the last completed step is saved)."""
    tc = config.train
    used = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        used = f" (peak {mb(torch.cuda.max_memory_allocated())} of {mb(total)} on this GPU)"
    precision = "" if tc.mixed_precision == "bf16" else " --mixed-precision bf16 (half the activation memory),"
    return ResourceError(
        f"Out of memory in step {step + 1}{used}: {str(exc).splitlines()[0][:200]} {saved} Lower train.batch_size "
        f"(now {tc.batch_size} per process) and raise train.grad_accum by the same factor to keep the images per "
        f"step (now {tc.batch_size * tc.grad_accum}),{precision} or use a smaller model; then --resume auto.")


def save_after_fault(trainer: Any, exc: BaseException) -> Exception:
    """Deprecated: :meth:`vaegan.Trainer.save_after_fault` (the trainer saves its own state)."""
    from ._deprecation import warn_deprecated

    warn_deprecated("vaegan.faults.save_after_fault(trainer, exc) is deprecated; use trainer.save_after_fault(exc).")
    return trainer.save_after_fault(exc)
