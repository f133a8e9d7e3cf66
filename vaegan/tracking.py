"""Experiment trackers (W&B, TensorBoard, any Accelerate tracker) that can never stop training.

The trainer's ``Accelerator`` is built with ``log_with=train.report_to``; :class:`Tracking` drives the
trackers Accelerate creates from it:

- :meth:`Tracking.start` calls ``accelerator.init_trackers`` with the resolved config, flattened to
  dotted keys and with secret-looking values redacted (:func:`tracker_config`), and puts W&B's files
  under the output directory unless ``WANDB_DIR`` says otherwise;
- :meth:`Tracking.log` sends scalars and :meth:`Tracking.log_images` image grids to each tracker;
- :meth:`Tracking.finish` closes them.

A tracker that raises (no network, no API key, a full disk, a bad ``WANDB_MODE``) is reported once
with a warning and switched off for the rest of the run; training, ``metrics.jsonl``, the PNG grids
and the checkpoints carry on as if it had never been configured.

Example:
    >>> from accelerate import Accelerator
    >>> tracking = Tracking(Accelerator(), project="vaegan", output_dir="outputs/run")
    >>> tracking.start(ExperimentConfig())  # no tracker configured: nothing happens
    >>> tracking.active
    []
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Union

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from torch import Tensor

from . import _compat
from .config import ExperimentConfig, to_dict

__all__ = ["REDACTED", "Tracking", "flatten", "scrub_secrets", "tracker_config", "grid_to_uint8"]

logger = logging.getLogger(__name__)

REDACTED = "<redacted>"
# Names of keys (config options, environment variables) whose values must never reach a tracker.
_SECRET_NAME = re.compile(r"api[_-]?key|token|secret|passw(or)?d|credential|private[_-]?key|auth", re.IGNORECASE)
_MIN_SECRET_LEN = 8  # shorter environment values (e.g. "1") would redact innocent config values

# Keyword arguments of each tracker's ``log_images``: TensorBoard's ``add_images`` assumes NCHW
# unless told; W&B's ``wandb.Image`` reads (H, W, C) arrays as they are.
_IMAGE_KWARGS: Dict[str, Dict[str, Any]] = {"tensorboard": {"dataformats": "NHWC"}}
# What to check when a tracker fails, by tracker name.
_HINTS = {
    "wandb": "Check WANDB_MODE (online, offline or disabled), WANDB_API_KEY (or `wandb login`) and "
             "WANDB_DIR; without a network, use WANDB_MODE=offline and upload later with `wandb sync`.",
    "tensorboard": "Check that the folder <output-dir>/<train.project> can be created and written.",
    "default": "Check the tracker's settings.",
}


def flatten(data: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mappings to one level of dotted keys; lists and other values become strings.

    Trackers accept only scalars as hyper-parameters (TensorBoard's ``add_hparams`` rejects lists).

    Example:
        >>> flatten({"model": {"name": "conv", "options": {"channels": [32, 64]}}})
        {'model.name': 'conv', 'model.options.channels': '[32, 64]'}
    """
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


def scrub_secrets(flat: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Dict[str, Any]:
    """Redact values that are, or contain, secrets.

    A value is redacted when its key's last part looks like a secret (``api_key``, ``token``,
    ``password``, ...) or when it contains the value of an environment variable whose name does
    (``WANDB_API_KEY``, ``HF_TOKEN``, ...).

    Args:
        flat: Dotted keys to scalar values (see :func:`flatten`).
        environ: Where to look for secret values; the process environment by default.

    Returns:
        A copy of ``flat`` with secret values replaced by :data:`REDACTED`.

    Example:
        >>> scrub_secrets({"data.options.api_token": "abc", "train.seed": 0}, environ={})
        {'data.options.api_token': '<redacted>', 'train.seed': 0}
    """
    secrets = _secret_values(environ)
    clean: Dict[str, Any] = {}
    for key, value in flat.items():
        leaf = key.rsplit(".", 1)[-1]
        if _SECRET_NAME.search(leaf) or (isinstance(value, str) and any(s in value for s in secrets)):
            clean[key] = REDACTED
        else:
            clean[key] = value
    return clean


def _secret_values(environ: Mapping[str, str]) -> List[str]:
    return [v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN]


def _redact_text(text: str, environ: Mapping[str, str] = os.environ) -> str:
    for secret in _secret_values(environ):
        text = text.replace(secret, REDACTED)
    return text


def tracker_config(config: ExperimentConfig, environ: Mapping[str, str] = os.environ) -> Dict[str, Any]:
    """The resolved config as trackers store it: flat dotted keys, secrets redacted.

    Example:
        >>> tracker_config(ExperimentConfig())["train.batch_size"]
        64
    """
    return scrub_secrets(flatten(to_dict(config)), environ)


def grid_to_uint8(grid: Tensor) -> np.ndarray:
    """A (C, H, W) image in [0, 1] (e.g. from ``torchvision.utils.make_grid``) to (H, W, C) uint8.

    Rounds as ``torchvision.utils.save_image`` does, so trackers show the pixels of the PNGs.

    Example:
        >>> grid_to_uint8(torch.ones(3, 2, 4)).shape
        (2, 4, 3)
    """
    from .images import to_uint8

    return to_uint8(grid).permute(1, 2, 0).numpy()  # (H, W, C)


class Tracking:
    """The experiment trackers of one run; every call is safe to make on every process.

    Args:
        accelerator: Its ``log_with`` names the trackers (``None``: none; calls do nothing).
        project: The tracker project (W&B project, TensorBoard sub-folder).
        output_dir: The run's output directory; W&B writes under it unless ``WANDB_DIR`` is set.

    Example:
        >>> tracking = Tracking(Accelerator(log_with="tensorboard", project_dir="out"), "vaegan", "out")  # doctest: +SKIP
        >>> tracking.start(config); tracking.log({"g/total": 0.5}, step=1); tracking.finish()  # doctest: +SKIP
    """

    def __init__(self, accelerator: Accelerator, project: str, output_dir: Union[str, Path]) -> None:
        self.accelerator = accelerator
        self.project = project
        self.output_dir = Path(output_dir)

    @property
    def active(self) -> List[str]:
        """Names of the trackers that are running (empty on processes other than the main one)."""
        return [t.name for t in self.accelerator.trackers]

    def init_kwargs(self, config: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
        """Per-tracker keyword arguments for ``init_trackers`` (Accelerate's ``init_kwargs``)."""
        # Keep the run (the input of `wandb sync`) with the outputs unless WANDB_DIR says otherwise.
        # Always explicit: wandb reads WANDB_DIR once per process, so a later run would miss a change.
        # The config also goes into the run record itself: Accelerate stores it with a later config.update,
        # which offline runs have been seen to lose (wandb/wandb#7227; our W&B test failed that way once).
        return {"wandb": {"dir": os.environ.get("WANDB_DIR") or str(self.output_dir), "config": dict(config)}}

    def start(self, config: ExperimentConfig) -> None:
        """Start the configured trackers and store the resolved config in them (main process only).

        A tracker that fails to start is switched off with a warning; nothing is raised.
        """
        acc = self.accelerator
        if not acc.log_with or not acc.is_main_process or acc.trackers:
            return
        try:
            values = tracker_config(config)
            acc.init_trackers(self.project, config=values, init_kwargs=self.init_kwargs(values))
        except Exception as exc:  # noqa: BLE001 - any tracker failure must leave training running
            # Accelerate starts the trackers in one loop, so we cannot tell which one raised:
            # close whatever started and run without trackers.
            names = ", ".join(t.name if isinstance(t, GeneralTracker) else str(t) for t in acc.log_with)
            self._warn(names, "starting", exc)
            for tracker in list(acc.trackers):
                self._close_quietly(tracker)
            _compat.clear_trackers(acc)
        else:
            logger.info("Experiment tracking with %s", ", ".join(self.active))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars at ``step`` to every running tracker."""
        values = dict(metrics)
        for tracker in list(self.accelerator.trackers):
            self._guard(tracker, "logging scalars", lambda t=tracker: t.log(values, step=step))

    def log_images(self, grids: Mapping[str, Tensor], step: int) -> None:
        """Log image grids, each (C, H, W) in [0, 1], under ``images/<name>`` at ``step``.

        Trackers without image support (custom ones may lack ``log_images``) are skipped.
        """
        trackers = [t for t in self.accelerator.trackers if hasattr(t, "log_images")]
        if not trackers:
            return
        images = {f"images/{name}": grid_to_uint8(grid)[None] for name, grid in grids.items()}  # (1, H, W, C)
        for tracker in trackers:
            kwargs = _IMAGE_KWARGS.get(tracker.name, {})
            self._guard(tracker, "logging images", lambda t=tracker: t.log_images(images, step=step, **kwargs))

    def finish(self) -> None:
        """Flush and close every running tracker (the W&B run, the TensorBoard writer).

        Unlike ``Accelerator.end_training`` this leaves the process group alone: the trainer still
        synchronises the processes after it.
        """
        for tracker in list(self.accelerator.trackers):
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - the run's outputs are written already
                self._warn(tracker.name, "finishing", exc)
        _compat.clear_trackers(self.accelerator)

    # ---- failures ----------------------------------------------------------------------------------
    def _guard(self, tracker: Any, action: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            self._warn(tracker.name, action, exc)
            _compat.remove_tracker(self.accelerator, tracker)
            self._close_quietly(tracker)

    @staticmethod
    def _warn(name: str, action: str, exc: BaseException) -> None:
        # One line, even for multi-line (pydantic) errors, and never an API key a library echoed.
        message = _redact_text(" ".join(str(exc).split()))
        logger.warning(
            "The experiment tracker '%s' failed while %s (%s: %s). It is switched off for the rest of this "
            "run; training continues, and metrics.jsonl, the sample PNGs and the checkpoints are still "
            "written. %s", name, action, type(exc).__name__, message, _HINTS.get(name, _HINTS["default"]))

    @staticmethod
    def _close_quietly(tracker: Any) -> None:
        try:
            tracker.finish()
        except Exception as exc:  # noqa: BLE001 - already reported; closing is best effort
            logger.debug("Closing the failed tracker %s raised %r", getattr(tracker, "name", tracker), exc)
