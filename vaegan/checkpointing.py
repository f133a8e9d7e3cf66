"""Atomic, rotating training checkpoints on top of ``Accelerator.save_state``.

Why not ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=K)``: Accelerate deletes
the oldest checkpoint *before* writing the new one (a crash then leaves fewer good checkpoints), reads
the iteration back from folder names, and loads ``register_for_checkpointing`` objects with
``weights_only=False`` (a pickle that can run code). Here:

- every rank writes into ``checkpoints/.tmp-step_XXXXXXXX``; the main process then writes
  ``vaegan_checkpoint.json`` (the marker of a complete checkpoint, with the step) and renames the folder
  to ``checkpoints/step_XXXXXXXX`` in one ``os.replace``;
- only then are the oldest complete checkpoints beyond the limit deleted;
- the trainer's own state (step counters, EMA weights) is JSON and safetensors, never pickle;
- "latest" is the complete checkpoint with the highest step *recorded in its marker*.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .errors import CheckpointError

__all__ = ["MARKER", "CheckpointManager", "list_checkpoints", "find_checkpoint"]

logger = logging.getLogger(__name__)

MARKER = "vaegan_checkpoint.json"
_PREFIX = "step_"
_TMP = ".tmp-"


def _read_marker(path: Path) -> Optional[Dict[str, Any]]:
    try:
        info = json.loads((path / MARKER).read_text())
        return info if isinstance(info, dict) and isinstance(info.get("step"), int) else None
    except (OSError, ValueError):
        return None


def list_checkpoints(root: Union[str, Path]) -> List[Path]:
    """Complete checkpoints under ``root`` (``<output-dir>/checkpoints``), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith(_TMP):
            info = _read_marker(p)
            if info is not None:
                found.append((info["step"], p))
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: Union[str, Path], resume: str) -> Path:
    """Resolve ``--resume``: ``"latest"`` (newest complete one under output_dir) or a folder.

    Raises:
        CheckpointError: nothing to resume from, or the folder is not a complete checkpoint.
    """
    if resume == "latest":
        ckpts = list_checkpoints(Path(output_dir) / "checkpoints")
        if not ckpts:
            raise CheckpointError(
                f"--resume latest found no complete checkpoint under '{Path(output_dir) / 'checkpoints'}'. "
                "Check --output-dir, or start without --resume."
            )
        return ckpts[-1]
    path = Path(resume)
    if not path.is_dir() or _read_marker(path) is None:
        raise CheckpointError(
            f"'{path}' is not a complete vaegan checkpoint (no readable {MARKER}). It may be an "
            "interrupted save; pass another folder under <output-dir>/checkpoints or use --resume latest."
        )
    return path


class CheckpointManager:
    """Writes checkpoints atomically and keeps the newest ``total_limit`` complete ones.

    Args:
        output_dir: The run's output folder; checkpoints go to ``output_dir/checkpoints``.
        total_limit: How many complete checkpoints to keep (>= 1).
    """

    def __init__(self, output_dir: Union[str, Path], total_limit: int) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def save(self, accelerator: Any, step: int, extra_files: Dict[str, Any], info: Dict[str, Any]) -> Path:
        """Save everything for ``step``; called on every process.

        Args:
            accelerator: The run's ``Accelerator`` (its ``save_state`` writes models, optimizers,
                schedulers, the grad scaler and every rank's RNG state).
            extra_files: file name -> callable(path) writing one more file (main process only).
            info: JSON-serialisable data stored in the marker (the step is added).

        Returns:
            The final checkpoint folder.
        """
        final = self.root / f"{_PREFIX}{step:08d}"
        tmp = self.root / f"{_TMP}{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save killed half-way
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, write in extra_files.items():
                write(tmp / name)
            marker = tmp / MARKER
            marker.write_text(json.dumps({**info, "step": step}, indent=2))
            _fsync_dir(tmp)
            if final.exists():  # the same step saved twice (e.g. end of training after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._rotate()
            logger.info("Saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        complete = list_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.total_limit)]:
            # Drop the marker first: a deletion killed half-way leaves an incomplete folder that
            # "latest" never picks, rather than a complete-looking broken one.
            (old / MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    # Make the rename durable (POSIX); a no-op where directories cannot be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
