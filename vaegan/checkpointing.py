"""Atomic, rotating training checkpoints on top of ``Accelerator.save_state``.

Why not ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=K)``: Accelerate deletes
the oldest checkpoint *before* writing the new one (a crash then leaves fewer good checkpoints), reads
the iteration back from folder names, and loads ``register_for_checkpointing`` objects with
``weights_only=False`` (a pickle that can run code). Here:

- every rank writes into ``checkpoints/.tmp-step_XXXXXXXX``; the main process then writes the marker
  ``vaegan_checkpoint.json`` (with the step) and renames the folder to ``checkpoints/step_XXXXXXXX`` in
  one ``os.replace``; only then are the oldest complete ones beyond the limit deleted;
- the trainer's own state (step counters, EMA weights) is JSON and safetensors, never pickle;
- "latest" (and "auto") is the complete checkpoint with the highest step *recorded in its marker*;
  leftovers of a killed save (``.tmp-*``) or rotation (``step_*`` without a marker) are never picked
  and are deleted at the next save;
- before anything is restored, :func:`verify_checkpoint` checks every file: safetensors headers
  against the live modules' keys and shapes, every pickled file (``optimizer.bin``, ``scheduler.bin``,
  ``random_states_*.pkl``, ...) with ``torch.load(weights_only=True)`` (a pickle that would run code is
  refused; Accelerate would unpickle a ``custom_checkpoint_*.pkl`` with ``weights_only=False``, so
  those are refused outright), the optimizer state against the parameters' shapes; and
  :class:`RestorePoint` puts the live objects back if a load still fails half-way.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .checkpoint_checks import _corrupt, safe_torch_load, verify_checkpoint  # noqa: F401  (public here too)
from .errors import CheckpointError, OutputError
from .files import share_like_umask

__all__ = ["MARKER", "CheckpointManager", "list_checkpoints", "find_checkpoint", "resolve_resume", "verify_checkpoint",
           "safe_torch_load", "RestorePoint", "read_counters", "restore", "read_marker", "name_step", "skipped_newer"]

logger = logging.getLogger(__name__)

MARKER = "vaegan_checkpoint.json"
_PREFIX = "step_"
_TMP = ".tmp-"


def mb(nbytes: float) -> str:
    """``nbytes`` for people: ``"12.3 MB"``."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def folder_bytes(path: Path) -> int:
    """The size of the files under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def read_marker(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The marker of a complete checkpoint folder (its step, epoch, batch layout), or None."""
    path = Path(path)
    try:
        info = json.loads((path / MARKER).read_text())
        return info if isinstance(info, dict) and isinstance(info.get("step"), int) else None
    except (OSError, ValueError):
        return None


def name_step(path: Union[str, Path]) -> Optional[int]:
    """The step in a checkpoint folder's name (``step_00000120`` -> 120), None for another name."""
    name = Path(path).name
    digits = name[len(_PREFIX):]
    return int(digits) if name.startswith(_PREFIX) and digits.isdigit() else None


def _why_not(p: Path) -> Optional[str]:
    """Why the folder ``p`` under checkpoints/ is not a complete checkpoint, or None when it is one."""
    if p.is_symlink():
        return "it is a symbolic link (a checkpoint is never read or deleted through one)"
    if p.name.startswith(_TMP):
        return "it is the temporary folder of a save that did not finish"
    info = read_marker(p)
    if info is None:
        return f"it has no readable {MARKER} (a save or a rotation that did not finish)"
    named = name_step(p)
    if named is not None and named != info["step"]:
        return f"its {MARKER} says step {info['step']} but its name says step {named} (edited or damaged)"
    return None


def list_checkpoints(root: Union[str, Path]) -> List[Path]:
    """Complete checkpoints under ``root`` (``<output-dir>/checkpoints``), oldest step first: folders with a
    marker whose step is the one in their name (links, unfinished saves and inconsistent folders never count)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(read_marker(p)["step"], p) for p in root.iterdir() if p.is_dir() and _why_not(p) is None]
    return [p for _, p in sorted(found)]


def skipped_newer(root: Union[str, Path], chosen: Optional[Path]) -> List[Tuple[Path, str]]:
    """Folders under ``root`` named for a later step than ``chosen`` that are not complete checkpoints, and why."""
    root = Path(root)
    if not root.is_dir():
        return []
    after = name_step(chosen) if chosen is not None else None
    threshold = after if after is not None else -1
    out = []
    for p in sorted(root.iterdir()):
        named = name_step(p.name[len(_TMP):] if p.name.startswith(_TMP) else p)
        why = _why_not(p) if named is not None and named > threshold else None
        if why is not None:
            out.append((p, why))
    return out


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
    if not path.is_dir() or read_marker(path) is None:
        raise CheckpointError(
            f"'{path}' is not a complete vaegan checkpoint (no readable {MARKER}). It may be an "
            "interrupted save; pass another folder under <output-dir>/checkpoints or use --resume latest."
        )
    why = _why_not(path)
    if why is not None and not path.is_symlink():  # a link the user names is theirs to name
        raise CheckpointError(f"'{path}' cannot be resumed: {why}. Pass another folder under "
                              "<output-dir>/checkpoints or use --resume latest.")
    return path


def resolve_resume(output_dir: Union[str, Path], resume: Optional[str]) -> Optional[Path]:
    """The checkpoint ``train.resume`` names, or None for a fresh start. ``"auto"``: the latest complete one
    when there is one, else None, so one job script is right on its first run and after every requeue.

    Raises:
        CheckpointError: ``"latest"`` or a folder that names no complete checkpoint.
    """
    if resume not in ("auto", "latest"):
        return find_checkpoint(output_dir, resume) if resume else None
    chosen = find_checkpoint(output_dir, "latest") if resume == "latest" else \
        (list_checkpoints(Path(output_dir) / "checkpoints") or [None])[-1]
    for path, why in skipped_newer(Path(output_dir) / "checkpoints", chosen):
        logger.warning("Not resuming from %s, though it is named for a later step: %s.", path, why)
    return chosen


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
            self._clean_leftovers()  # of saves or rotations killed half-way
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every rank's files complete before any rank looks at the folder
            share_like_umask(tmp)  # safetensors writes 0600: the team's readers need the umask's mode
            if accelerator.is_main_process:
                for name, write in extra_files.items():
                    write(tmp / name)
                share_like_umask(tmp)
                for file in tmp.iterdir():  # every rank's files on disk before the marker says "complete"
                    _fsync(file)
                marker = tmp / MARKER
                marker.write_text(json.dumps({**info, "step": step}, indent=2))
                _fsync(marker)
                _fsync(tmp)
        except Exception as exc:  # no space, a quota, an I/O error (torch's zip writer raises RuntimeError)
            raise self._failed(step, tmp, exc) from exc
        if accelerator.is_main_process:
            old = None
            if final.exists():  # the same step saved again (after resuming from an older checkpoint)
                # Moved aside under a name that stays a complete, resumable checkpoint until the swap.
                old = final.with_name(final.name + ".replaced")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._rotate()
            logger.info("Saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    def _failed(self, step: int, tmp: Path, exc: BaseException) -> OutputError:
        """Remove a save's half-written folder; the one paragraph that says what is kept and what to do."""
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        done = list_checkpoints(self.root)
        size = folder_bytes(done[-1]) if done else written
        free = shutil.disk_usage(self.root).free if self.root.is_dir() else 0
        kept = f"The last complete checkpoint, {done[-1]}, is intact" if done else "No checkpoint was complete yet"
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if "inline_container" in why or "PytorchStreamWriter" in why:  # torch's zip writer says only this
            why = f"torch's file writer stopped part-way, {why}: no space left, a quota or a file-size limit"
        return OutputError(
            f"Saving the checkpoint of step {step} failed ({why}); "
            f"its half-written folder was removed. {kept}. A checkpoint needs about {mb(size)} and "
            f"{mb(free)} are free under '{self.root}'. Free some space (or lower "
            "train.checkpoints_total_limit), then continue with --resume auto.")

    def _clean_leftovers(self) -> None:
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.is_symlink():  # not this run's: never deleted, nor anything it points to
                continue
            killed_save = p.name.startswith(_TMP)
            killed_rotation = p.name.startswith(_PREFIX) and read_marker(p) is None
            if p.is_dir() and (killed_save or killed_rotation):
                logger.info("Removing %s, left by an interrupted %s", p, "save" if killed_save else "rotation")
                shutil.rmtree(p, ignore_errors=True)

    def _rotate(self) -> None:
        complete = list_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.total_limit)]:
            # Drop the marker first: a deletion killed half-way leaves an incomplete folder that
            # "latest" never picks, rather than a complete-looking broken one.
            (old / MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    # Flush a file's data, or a folder's entries (a rename), to disk: a power cut after the rename must
    # not leave a "complete" checkpoint with empty files. A no-op where folders cannot be opened.
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


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class RestorePoint:
    """A copy (on the CPU) of everything a resume mutates, to put back if the resume fails half-way.

    Args:
        objects: Anything with ``state_dict``/``load_state_dict`` (models, optimizers, schedulers, EMA);
            :func:`restore` shows the use.
    """

    def __init__(self, objects: Sequence[Any]) -> None:
        self.objects = list(objects)
        self.states = [_cpu_copy(o.state_dict()) for o in self.objects]
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def restore(self) -> None:
        """Load the copied states back (tensors are copied onto the objects' own devices)."""
        for obj, state in zip(self.objects, self.states):
            obj.load_state_dict(state)
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.rng[3] is not None:
            torch.cuda.set_rng_state_all(self.rng[3])


def read_counters(path: Union[str, Path], names: Sequence[str]) -> Dict[str, int]:
    """Read a JSON file of integer counters (``trainer_state.json``) whose keys are among ``names``.

    Raises:
        CheckpointError: missing, not JSON, unknown keys, or values that are not integers >= 0.
    """
    path = Path(path)
    if not path.is_file():
        raise _corrupt(path, "is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _corrupt(path, f"is corrupt ({exc})") from None
    if not isinstance(data, dict) or set(data) - set(names) or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()):
        raise _corrupt(path, f"is corrupt: expected integer counters >= 0 among {list(names)}, got {data!r}")
    return data


def restore(accelerator: Any, path: Union[str, Path], models: Sequence[torch.nn.Module],
            optimizers: Sequence[Any], schedulers: Sequence[Any],
            extra_safetensors: Optional[Mapping[str, torch.nn.Module]] = None) -> None:
    """Verify every file of a checkpoint, then ``accelerator.load_state`` it (and load extra modules).

    Args:
        accelerator: The run's Accelerator; ``models``/``optimizers``/``schedulers`` are its prepared
            objects in ``prepare`` order.
        extra_safetensors: File name -> module whose state dict the file holds (e.g. the EMA).

    Raises:
        CheckpointError: from :func:`verify_checkpoint`, or a load that failed anyway, in which case
            every object (and the RNG) is first put back as it was.
    """
    path, extra = Path(path), dict(extra_safetensors or {})
    verify_checkpoint(path, [accelerator.unwrap_model(m) for m in models], optimizers,
                      process_index=accelerator.process_index,
                      extra_safetensors={name: m.state_dict() for name, m in extra.items()})
    from safetensors.torch import load_file

    point = RestorePoint([*models, *optimizers, *schedulers, *extra.values()])
    try:
        accelerator.load_state(str(path))
        for name, module in extra.items():
            module.load_state_dict(load_file(str(path / name)))  # copied onto the module's own device
    except Exception as exc:  # an I/O error, or a file that passed verification but still does not fit
        point.restore()
        raise CheckpointError(
            f"Checkpoint '{path}' could not be restored ({type(exc).__name__}: {exc}); the trainer was put back "
            "as it was. Resume from another checkpoint under <output-dir>/checkpoints."
        ) from exc
