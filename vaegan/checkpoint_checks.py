"""Checks of every file of a checkpoint before anything is restored from it (:mod:`vaegan.checkpointing`).

safetensors headers against the live modules' keys and shapes, every pickled file (``optimizer.bin``,
``scheduler.bin``, ``random_states_*.pkl``, ...) with ``torch.load(weights_only=True)`` (a pickle that would
run code is refused; Accelerate would unpickle a ``custom_checkpoint_*.pkl`` with ``weights_only=False``, so
those are refused outright), and the optimizer state against the parameters' shapes.

Example:
    >>> verify_checkpoint("out/checkpoints/step_00001000", [vae], [opt])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from . import _compat
from .errors import CheckpointError

__all__ = ["safe_torch_load", "verify_checkpoint"]

logger = logging.getLogger("vaegan.checkpointing")  # the messages users know, from the module they know

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
    from safetensors import safe_open

    if not path.is_file():
        hint = " (a pickled .bin model is not accepted: vaegan restores weights from safetensors only)" \
            if path.with_suffix(".bin").is_file() or (path.parent / "pytorch_model.bin").is_file() else ""
        raise _corrupt(path, f"is missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # SafetensorError: bad header, file shorter than its header says
        raise _corrupt(path, f"is not a readable safetensors file ({exc}); it is truncated or corrupt") from None
    want = {k: tuple(v.shape) for k, v in expected.items()}
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    wrong = [f"{k} {shapes[k]} vs {want[k]}" for k in sorted(set(want) & set(shapes)) if shapes[k] != want[k]]
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
