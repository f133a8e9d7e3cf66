"""Every private attribute of Accelerate and PyTorch that vaegan relies on, in one place.

Each entry says why vaegan needs it. :func:`check` exercises each one for real and returns what is
missing, by name; ``tests/test_compat.py`` fails with that list when an upgrade of torch or Accelerate
removes or changes one, instead of a training run failing somewhere later. Nothing else in vaegan (or
its tests) touches these attributes directly.

Example:
    >>> check()
    []
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["plain_forward", "set_found_inf", "torch_safe_globals", "remove_tracker", "clear_trackers",
           "reset_accelerate_state", "foreach_mul_", "foreach_add_", "foreach_mul", "TorchDispatchMode",
           "LOCAL_SCALAR_DENSE", "check"]


def plain_forward(module: nn.Module) -> None:
    """Undo Accelerate's autocast wrapper of a prepared module's ``forward`` (``_original_forward``).

    Why: the discriminator step enters ``accelerator.autocast()`` itself, and a term (R1) must be able to
    switch autocast off for an fp32 forward, which the wrapper would override.
    """
    if hasattr(module, "_original_forward"):
        module.forward = module._original_forward


def set_found_inf(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Hand a fused optimizer the device flag that makes its kernel skip the step (``opt.found_inf``).

    Why: it is GradScaler's contract with the fused Adam(W) kernels; it lets a NaN/inf step be skipped
    on the device, with no host sync.
    """
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]


def torch_safe_globals() -> List[Any]:
    """The numpy types Accelerate's RNG-state pickles contain (``accelerate.utils.other.TORCH_SAFE_GLOBALS``).

    Why: vaegan loads every pickled checkpoint file with ``weights_only=True``; these are the globals
    that Accelerate's own files need allowed.
    """
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    return list(TORCH_SAFE_GLOBALS)


def remove_tracker(accelerator: Any, tracker: Any) -> None:
    """Drop one tracker from ``accelerator.trackers`` (a failed tracker must never stop training)."""
    if tracker in accelerator.trackers:
        accelerator.trackers.remove(tracker)


def clear_trackers(accelerator: Any) -> None:
    """Empty ``accelerator.trackers`` without ``end_training`` (which also destroys the process group)."""
    accelerator.trackers.clear()


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (``AcceleratorState._reset_state``), so a new
    Accelerator can be built with other settings in the same process (tests, notebooks, benchmarks)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# Tensor-list arithmetic in one kernel per op. Why: the EMA update takes a *tensor* factor, and the
# public torch.optim helpers (and _foreach_lerp_) would read it on the host, a sync per step on a GPU.
foreach_mul_: Callable[..., Any] = torch._foreach_mul_
foreach_add_: Callable[..., Any] = torch._foreach_add_
foreach_mul: Callable[..., Any] = torch._foreach_mul

# Test instruments: see every aten call (layouts, host reads) made inside a step.
LOCAL_SCALAR_DENSE = torch.ops.aten._local_scalar_dense.default  # what .item()/bool() on a tensor dispatch to


# ---- checks ---------------------------------------------------------------------------------------
def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _check_original_forward() -> None:
    from accelerate import Accelerator

    reset_accelerate_state()
    try:
        module = Accelerator(cpu=True, mixed_precision="bf16").prepare(nn.Linear(2, 2))
        _expect(hasattr(module, "_original_forward"), "prepared module has no _original_forward")
        plain_forward(module)
        _expect(module.forward == module._original_forward, "restoring _original_forward did not take")
    finally:
        reset_accelerate_state()


def _check_found_inf() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=1.0, fused=True)
    p.grad = torch.ones(2)
    set_found_inf(opt, torch.ones((), dtype=torch.float32))
    opt.step()
    _expect(torch.equal(p.detach(), torch.ones(2)), "fused AdamW ignored optimizer.found_inf")


def _check_safe_globals() -> None:
    import numpy as np

    state = {"rng": np.random.get_state()}
    path = _tmp_file()
    torch.save(state, path)
    with torch.serialization.safe_globals(torch_safe_globals()):
        torch.load(path, weights_only=True)


def _tmp_file() -> str:
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".pkl")
    os.close(fd)
    return path


def _check_trackers() -> None:
    from accelerate import Accelerator

    reset_accelerate_state()
    try:
        acc = Accelerator(cpu=True)
        _expect(isinstance(acc.trackers, list), "Accelerator.trackers is no longer a list")
        acc.trackers.append("probe")
        remove_tracker(acc, "probe")
        clear_trackers(acc)
        _expect(acc.trackers == [], "Accelerator.trackers could not be emptied")
    finally:
        reset_accelerate_state()


def _check_foreach() -> None:
    xs = [torch.ones(2)]
    foreach_mul_(xs, torch.tensor(2.0))
    foreach_add_(xs, foreach_mul(xs, torch.tensor(0.5)))
    _expect(torch.equal(xs[0], torch.full((2,), 3.0)), "foreach ops with a tensor factor gave the wrong result")


def _check_dispatch() -> None:
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        float(torch.ones(()) + 1)
    _expect(LOCAL_SCALAR_DENSE in seen, "float(tensor) no longer dispatches to aten._local_scalar_dense")


CHECKS: Sequence[Tuple[str, Callable[[], None]]] = (
    ("accelerate: prepared module's _original_forward", _check_original_forward),
    ("torch: fused AdamW reads optimizer.found_inf", _check_found_inf),
    ("accelerate.utils.other.TORCH_SAFE_GLOBALS", _check_safe_globals),
    ("accelerate: Accelerator.trackers is a mutable list", _check_trackers),
    ("accelerate.state: AcceleratorState/GradientState._reset_state", reset_accelerate_state),
    ("torch._foreach_mul_ / _foreach_add_ / _foreach_mul with a tensor factor", _check_foreach),
    ("torch.utils._python_dispatch.TorchDispatchMode and aten._local_scalar_dense", _check_dispatch),
)


def check() -> List[str]:
    """Exercise every internal above; returns ``"<name>: <error>"`` for each that no longer works."""
    problems = []
    for name, probe in CHECKS:
        try:
            probe()
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    return problems
