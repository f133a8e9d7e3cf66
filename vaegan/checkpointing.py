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
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _compat
from .errors import CheckpointError, OutputError
from .files import mb, safetensors_shapes, shape_differences, share_like_umask

__all__ = ["MARKER", "CheckpointManager", "list_checkpoints", "find_checkpoint", "resolve_resume", "verify_checkpoint",
           "safe_torch_load", "RestorePoint", "read_counters", "restore", "read_marker", "name_step", "skipped_newer"]

logger = logging.getLogger(__name__)

MARKER = "vaegan_checkpoint.json"
_PREFIX = "step_"
_TMP = ".tmp-"


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


# ---- checks of every file of a checkpoint, before anything is restored from it ------------------------------

_PICKLED = re.compile(r".*\.(bin|pkl|pt|pth)$")
_CUSTOM = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint file '{path}' {what}. Nothing was restored from it. Resume from another checkpoint "
        "(they are kept under <output-dir>/checkpoints; --resume auto picks the newest complete one) or "
        "start a new output directory."
    )


def safe_torch_load(path: Union[str, Path]) -> Any:
    """``torch.load(path, weights_only=True)`` with the numpy allowlist Accelerate's own loader adds.

    A file that passes here is exactly one Accelerate can load without running code; a pickle that
    references any other callable (``os.system``, ``builtins.open``, ...) is refused by torch's
    restricted unpickler before anything is constructed.

    Raises:
        CheckpointError: unreadable, truncated, or not loadable without running code.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_compat.torch_safe_globals()):  # numpy types in RNG states
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, zip errors, EOFError, RuntimeError from torch
        raise _corrupt(path, f"cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                             "it is truncated, corrupt, or a pickle that would run code when loaded") from None


def _check_safetensors(path: Path, expected: Mapping[str, torch.Tensor]) -> None:
    if not path.is_file():
        hint = " (a pickled .bin model is not accepted: vaegan restores weights from safetensors only)" \
            if path.with_suffix(".bin").is_file() or (path.parent / "pytorch_model.bin").is_file() else ""
        raise _corrupt(path, f"is missing{hint}")
    try:
        shapes = safetensors_shapes(path)
    except Exception as exc:  # SafetensorError: bad header, file shorter than its header says
        raise _corrupt(path, f"is not a readable safetensors file ({exc}); it is truncated or corrupt") from None
    want = {k: tuple(v.shape) for k, v in expected.items()}
    missing, unexpected, wrong_keys = shape_differences(shapes, want)
    wrong = [f"{k} {shapes[k]} vs {want[k]}" for k in wrong_keys]
    if missing or unexpected or wrong:
        raise _corrupt(path, f"does not fit this run's architecture (missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}, shape saved vs expected {wrong[:4]}); it was saved with a different "
                             "model, discriminator or loss configuration")


def _check_optimizer(path: Path, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    live = optimizer.state_dict()
    if not isinstance(saved, dict) or not {"state", "param_groups"} <= set(saved):
        raise _corrupt(path, "is not an optimizer state")
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in live["param_groups"]]:
        raise _corrupt(path, f"holds parameter groups of sizes {sizes}, but this run's optimizer has "
                             f"{[len(g['params']) for g in live['param_groups']]}: another architecture")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, state in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(state, dict):
            raise _corrupt(path, f"has state for an unknown parameter {index!r}")
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[index].shape:
                raise _corrupt(path, f"has '{name}' of shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(params[index].shape)}: another architecture")


def verify_checkpoint(path: Union[str, Path], models: Sequence[torch.nn.Module],
                      optimizers: Sequence[torch.optim.Optimizer], *, process_index: int = 0,
                      extra_safetensors: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> None:
    """Check every file of a checkpoint before anything is restored from it.

    Args:
        path: A checkpoint folder written by :class:`CheckpointManager`.
        models: The unwrapped models in ``Accelerator.prepare`` order (``model.safetensors``,
            ``model_1.safetensors``, ...).
        optimizers: The optimizers in the same order (``optimizer.bin``, ``optimizer_1.bin``, ...).
        process_index: This process's rank (its ``random_states_<rank>.pkl``).
        extra_safetensors: File name -> expected state dict (e.g. the EMA).

    Raises:
        CheckpointError: naming the first file that is missing, truncated, unsafe or from another
            architecture.

    Example:
        >>> verify_checkpoint("out/checkpoints/step_00001000", [vae], [opt])  # doctest: +SKIP
    """
    path = Path(path)
    for i, model in enumerate(models):
        _check_safetensors(path / f"model{'' if i == 0 else f'_{i}'}.safetensors", model.state_dict())
    for name, expected in (extra_safetensors or {}).items():
        _check_safetensors(path / name, expected)
    custom = sorted(p.name for p in path.iterdir() if _CUSTOM.match(p.name))
    if custom:
        # Accelerate unpickles these with weights_only=False; vaegan registers no custom objects.
        raise _corrupt(path / custom[0], "is a custom Accelerate state, which vaegan never writes and which "
                                         "Accelerate would unpickle with weights_only=False (code execution)")
    for i, opt in enumerate(optimizers):
        name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
        if not (path / name).is_file():
            raise _corrupt(path / name, "is missing")
    rng = path / f"random_states_{process_index}.pkl"
    if not rng.is_file():
        logger.warning("%s is missing: the random number generators are not restored, so the resumed run will "
                       "not repeat the original exactly (was it saved with fewer processes?).", rng)
    for file in sorted(p for p in path.iterdir() if p.is_file() and _PICKLED.match(p.name)):
        saved = safe_torch_load(file)
        match = re.fullmatch(r"optimizer(?:_(\d+))?\.bin", file.name)
        if match and int(match.group(1) or 0) < len(optimizers):
            _check_optimizer(file, saved, optimizers[int(match.group(1) or 0)])
