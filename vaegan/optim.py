"""Optimizers, their schedules, the EMA update and the default precision of the trainer.

Kept apart from the training loop so each piece can be tested on its own: the fused AdamW that skips a
NaN/inf step on the device (:func:`step_unless`), the warm-up EMA that holds still on such a step
(:class:`WarmupEMA`) and the hardware-dependent precision default (:func:`default_precision`, with
``mixed_precision: auto``'s detection of bf16 units).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _compat
from .config import OptimConfig

logger = logging.getLogger(__name__)

__all__ = ["WarmupEMA", "default_precision", "resolve_auto_precision", "cpu_bf16_units", "BF16_CPU_FLAGS",
           "step_unless", "build_optimizer"]


class WarmupEMA:
    """An EMA update for ``AveragedModel(multi_avg_fn=...)`` whose decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` after n optimizer steps (as timm and diffusers do).

    A fixed 0.999 would keep ~70% of the random initial weights after 374 steps; the warm-up makes
    the EMA useful from the first epoch. Set :attr:`skip` to the step guard's ``found_inf`` before each
    update: a skipped step then leaves the EMA exactly as it was. Everything stays on the device.

    Example:
        >>> ema = torch.optim.swa_utils.AveragedModel(nn.Linear(2, 2), multi_avg_fn=WarmupEMA(0.999))  # doctest: +SKIP
    """

    def __init__(self, decay: float, averaged: Optional[nn.Module] = None) -> None:
        self.decay = decay
        self.skip: Optional[Tensor] = None  # 0-dim, 1.0 when this step was skipped
        # The averaged copy (AveragedModel.module): its frozen parameters are left exactly as they are (a
        # decoder-only fine-tune's encoder), where an average of equal values could move by a rounding error.
        self.averaged = averaged

    def __call__(self, ema_params: List[Tensor], params: List[Tensor], num_averaged: Tensor) -> None:
        if self.averaged is not None:
            frozen = {p.data_ptr() for p in self.averaged.parameters() if not p.requires_grad}
            if frozen:  # AveragedModel hands detached views: their storage says which parameter they are
                keep = [i for i, e in enumerate(ema_params) if e.data_ptr() not in frozen]
                if not keep:
                    return
                ema_params, params = [ema_params[i] for i in keep], [params[i] for i in keep]
        n = num_averaged.to(ema_params[0].device, torch.float32)
        d = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        if self.skip is not None:
            d = torch.where(self.skip > 0, 1.0, d)  # ema * 1 + params * 0: the EMA weights stay as they are
        # mul/add take a tensor factor (the .Tensor overloads); _foreach_lerp_ would turn d into a Python
        # scalar, a host sync per step on a GPU.
        _compat.foreach_mul_(ema_params, d)
        _compat.foreach_add_(ema_params, _compat.foreach_mul(params, 1.0 - d))


# CPU flags of bf16 arithmetic units, best first (Linux /proc/cpuinfo names): AMX tiles (Sapphire Rapids and
# later) and AVX512-BF16 (Cooper Lake, Zen 4 and later). Without them bf16 autocast is emulated: the spatial
# autoencoder trained 10x slower in bf16 than in fp32 on an AVX2-only EPYC (docs/benchmarks.md).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The first of :data:`BF16_CPU_FLAGS` this CPU reports, or None (also where /proc/cpuinfo does not exist).

    Example:
        >>> cpu_bf16_units() in (None, "amx_bf16", "avx512_bf16")
        True
    """
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def resolve_auto_precision() -> Tuple[str, str]:
    """What ``mixed_precision: auto`` means on this machine, and why: ``("bf16" | "no", reason)``."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(0)} supports bf16"
        return "no", f"{torch.cuda.get_device_name(0)} has no bf16 support"
    units = cpu_bf16_units()
    if units is not None:
        return "bf16", f"this CPU has bf16 units ({units})"
    return "no", "this CPU has no bf16 units (no amx_bf16 / avx512_bf16 flag), where bf16 autocast is emulated and slow"


def default_precision(requested: Optional[str]) -> Optional[str]:
    """``requested`` if set (``auto``: a precision ``accelerate launch``/``accelerate config`` set other than
    ``no``, else :func:`resolve_auto_precision`); else what they set (None lets Accelerate read it); else bf16 on a GPU that
    supports it, and fp32 otherwise.

    Example:
        >>> default_precision("no")
        'no'
    """
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    # `accelerate launch` always sets this variable, to "no" when nobody asked for a precision: only another value
    # is the user's choice over auto's (fp32 with auto in a recipe: train.mixed_precision=no).
    if requested == "auto" and launcher not in (None, "", "no"):
        logger.info("mixed_precision: auto -> %s, as accelerate launch / accelerate config set it", launcher)
        return None
    if requested == "auto":
        choice, reason = resolve_auto_precision()
        logger.info("mixed_precision: auto -> %s (%s); set train.mixed_precision (or --mixed-precision) to choose",
                    "bf16" if choice == "bf16" else "fp32", reason)
        return choice
    if requested is not None or launcher:
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"  # same range as fp32, no loss scaling; about 2x the conv/matmul throughput
    return None


def step_unless(opt: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``opt.step()`` unless ``found_inf`` (0-dim device tensor) is 1.

    A fused optimizer reads ``found_inf`` in its kernel and skips the update and its step count on the
    device (the contract GradScaler uses), so the host never waits. An optimizer without a fused kernel
    for this device has no such input: there one host read decides.
    """
    if opt.defaults.get("fused"):
        _compat.set_found_inf(opt, found_inf)
        opt.step()
    elif not bool(found_inf):
        opt.step()


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, total_steps: int
                    ) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused where the device has a kernel, else foreach) and its warm-up/decay schedule.

    Args:
        params: The player's parameters; frozen ones are left out.
        cfg: Learning rate, betas, weight decay, ``warmup_steps`` and ``decay`` (``cosine`` or constant).
        total_steps: Optimizer steps of the run (the cosine's length).

    Returns:
        ``(optimizer, scheduler)``; step the scheduler once per optimizer step.

    Example:
        >>> opt, sched = build_optimizer(nn.Linear(2, 2).parameters(), OptimConfig(), total_steps=100)
        >>> opt.defaults["fused"]
        True
    """
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    try:  # fused: one kernel for the whole update (CPU and CUDA); measured 3x faster than foreach on CPU
        opt = torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # a device without a fused kernel: one kernel per parameter group
        opt = torch.optim.AdamW(params, foreach=True, **kwargs)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
