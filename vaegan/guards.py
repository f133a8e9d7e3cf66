"""Training guards: non-finite steps and discriminator collapse (stopping on signals is :mod:`vaegan.preemption`).

- :class:`StepGuard` decides, on the device, whether each optimizer step is applied: every loss, the
  input batch and both players' clipped gradient norms must be finite on *every* process. The flags
  are stacked into one vector and, with several processes, summed by one ``accelerator.reduce`` (so
  all DDP ranks agree). :meth:`StepGuard.check` returns the verdict as a device tensor
  (``found_inf``) that the fused optimizers and the EMA read on the device: a bad step changes no
  weight, and the host never waits for it. The host reads the guard's counters only at
  :meth:`StepGuard.sync` (the trainer's log intervals, checkpoints, evaluations and the end): skipped
  steps are then counted and logged, and after ``max_consecutive`` skips in a row training stops with
  :class:`TrainingDiverged`.
- :class:`CollapseMonitor` reads the metrics already averaged over processes at each log interval
  (no extra host sync) and warns when the discriminator wins everything for several intervals in a
  row or the generator's adversarial loss explodes.
- :class:`vaegan.preemption.RunControl` makes every process agree, through flags the guard reduces with each
  step (:attr:`StepGuard.flags`), on the step after which the run saves or stops.

Example:
    >>> guard = StepGuard(max_consecutive=3)
    >>> guard.watch("g loss", torch.tensor(float("nan")))
    >>> guard.check({"grad_norm/g": torch.tensor(1.0)}, step=7)
    tensor(1.)
    >>> guard.sync(step=7)
    1
    >>> guard.consecutive
    1
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ._deprecation import deprecated_names
from .errors import TrainingDiverged

__all__ = ["TrainingDiverged", "StepGuard", "CollapseMonitor", "all_finite"]

logger = logging.getLogger(__name__)



class StepGuard:
    """Skips optimizer steps whose losses, inputs or gradients are not finite; stops after too many.

    Call :meth:`watch` with each micro-batch's losses (device tensors), then :meth:`check` once per
    optimizer step with the gradient norms: it returns ``found_inf`` (a 0-dim float32 device tensor,
    1.0 when the step must be skipped) without any host sync. Call :meth:`sync` at intervals: the one
    host read, which counts and logs the skipped steps and raises when too many came in a row.

    Args:
        max_consecutive: Skipped steps in a row after which :meth:`sync` raises.
        accelerator: Reduces the flags over processes; None for a single process.
        fp16_scaler: True when a GradScaler is in use: a gradient overflow with finite losses is
            then routine loss-scale calibration, logged at INFO instead of WARNING.
    """

    def __init__(self, max_consecutive: int, accelerator: Any = None, fp16_scaler: bool = False) -> None:
        self.max_consecutive = max_consecutive
        self.accelerator = accelerator
        self.fp16_scaler = fp16_scaler
        self.consecutive = 0  # skipped steps in a row, as of the last sync
        # Host values summed over processes along with each step's flags (RunControl's stop/save requests):
        # ``flags()`` is called in :meth:`check`, the sums are left in ``reduced_flags`` (device).
        self.flags: Optional[Callable[[], Sequence[float]]] = None
        self.reduced_flags: Optional[Tensor] = None
        self._ok: Dict[str, Tensor] = {}  # this step's watched values: name -> finite (device bool)
        # Device-side counters since the last sync (created on the first check, on the flags' device).
        self._counters: Optional[Tensor] = None  # (4,): skipped, current run, longest run, last bad step
        self._culprits: Dict[str, Tensor] = {}  # name -> steps it was non-finite in
        self._first_step: Optional[int] = None  # first step checked since the last sync

    @property
    def _single(self) -> bool:
        return self.accelerator is None or self.accelerator.num_processes == 1

    def watch(self, name: str, value: Tensor) -> None:
        """Remember whether ``value`` (a loss, a batch) is all finite; a device op, no host sync."""
        ok = torch.isfinite(value.detach()).all()
        self._ok[name] = self._ok[name] & ok if name in self._ok else ok

    def check(self, grad_norms: Mapping[str, Tensor], step: int) -> Tensor:
        """Decide on the device whether this step is applied; clears what :meth:`watch` collected.

        Args:
            grad_norms: Name -> total gradient norm of one player (before clipping).
            step: The step being decided (for the messages of :meth:`sync`).

        Returns:
            ``found_inf``: a 0-dim float32 tensor on the flags' device, 1.0 when something was not
            finite on any process (skip the step), else 0.0. Reading it on the host would be a sync.
        """
        values = {**self._ok, **{n: torch.isfinite(v.detach()).all() for n, v in grad_norms.items()}}
        self._ok = {}
        names = list(values)
        device = values[names[0]].device if names else torch.device("cpu")
        # Fill kernels, not a host-to-device copy: no sync. (n + k,): 1 where something is wrong on this
        # process, then the control flags; summed over processes in the one collective of the step.
        extra = [torch.full((1,), float(v), device=device) for v in (self.flags() if self.flags is not None else ())]
        bad = torch.cat([(~torch.stack([values[n] for n in names])).float().reshape(-1), *extra]
                        if names else [torch.zeros(0, device=device), *extra])
        if not self._single:
            bad = self.accelerator.reduce(bad, "sum")
        n = len(names)
        self.reduced_flags = bad[n:]
        found_inf = (bad[:n].sum() > 0).float()
        if self._counters is None:
            self._counters = torch.zeros(4, device=device)
        skipped, run, longest, last = self._counters.unbind()
        run = (run + 1) * found_inf  # back to 0 on an applied step
        self._counters = torch.stack([skipped + found_inf, run, torch.maximum(longest, run),
                                      torch.where(found_inf > 0, float(step), last)])
        for name, flag in zip(names, bad[:n].unbind()):
            hit = (flag > 0).float()
            self._culprits[name] = self._culprits[name] + hit if name in self._culprits else hit
        if self._first_step is None:
            self._first_step = step
        return found_inf

    def sync(self, step: int) -> int:
        """Read the counters since the last sync (the one host read); log and reset them.

        Returns:
            The number of steps skipped since the last sync.

        Raises:
            TrainingDiverged: ``max_consecutive`` or more steps in a row were skipped.
        """
        if self._counters is None:
            return 0
        names = list(self._culprits)
        values = torch.cat([self._counters, torch.stack([self._culprits[n] for n in names])]) if names else self._counters
        skipped, run, longest, last, *counts = values.tolist()  # the host read
        first = self._first_step
        self._counters = torch.stack([torch.zeros_like(self._counters[0]), self._counters[1], self._counters[1],
                                      torch.full_like(self._counters[0], -1)])
        self._culprits, self._first_step = {}, None
        self.consecutive = int(run)
        if not skipped:
            return 0
        failed = [f"{n} ({int(c)}x)" for n, c in zip(names, counts) if c > 0]
        overflow_only = self.fp16_scaler and all(n.startswith("grad_norm/") for n, c in zip(names, counts) if c > 0)
        logger.log(
            logging.INFO if overflow_only else logging.WARNING,
            "%s: %d optimizer step(s) skipped for both players (the last at step %d), non-finite %s; "
            "at most %d in a row%s.", f"Step {step}" if first == step else f"Steps {first}-{step}", int(skipped),
            int(last), ", ".join(failed), int(longest),
            "; fp16 gradient overflow, the loss scale is lowered" if overflow_only else "",
        )
        if longest >= self.max_consecutive:
            raise TrainingDiverged(
                f"Training stopped at step {step}: {int(longest)} optimizer steps in a row had non-finite values "
                f"({', '.join(failed)} since step {first}), so the run has diverged. Those steps changed no "
                "weight and the weights are not saved now, so the newest checkpoint under <output-dir>/checkpoints "
                "holds the last good weights. Lower optim_g.lr/optim_d.lr, keep grad_clip on, prefer bf16 to fp16, "
                "check the data, then resume with --resume latest (or an earlier checkpoint). "
                "train.max_nonfinite_steps sets how many skipped steps in a row are tolerated."
            )
        return int(skipped)


@dataclass
class CollapseMonitor:
    """Warns once when the discriminator has won, from metrics already reduced at a log interval.

    "Won" means, for ``patience`` log intervals in a row, any of:

    - D classifies at least ``accuracy_max`` of both real and fake images correctly (``d/acc_real``,
      ``d/acc_fake``: logit > 0 means "real");
    - the mean logits are ``logit_gap_max`` apart (``d/logits_real - d/logits_fake``): with the hinge loss
      both sides are then past their margins, so D has nothing left to learn from them and the
      generator's hinge loss saturates (the ldm_kl_f4 run of docs/benchmarks.md: about 2);
    - VQGAN's adaptive weight (``g/adaptive_weight``) fell below ``adaptive_drop`` of the first value
      logged: the adversarial gradient at the decoder's last layer grew while the reconstruction's did not,
      so the GAN term is scaled away (0.05 -> 0.003 in that run);
    - the generator's adversarial loss ``g/adversarial`` exceeds ``adversarial_max``.

    The warning names the numbers and the knobs, once per run (a GAN that stays lost would otherwise
    repeat it every few seconds); :attr:`warned` says whether it fired.

    Example:
        >>> monitor = CollapseMonitor(patience=1)
        >>> monitor.update(10, {"d/acc_real": 1.0, "d/acc_fake": 1.0})[:33]
        'The discriminator has won at step'
    """

    accuracy_max: float = 0.99  # right on >= 99% of both real and fake: G gets almost no signal
    logit_gap_max: float = 4.0  # real and fake logits each ~2 past the decision boundary, beyond hinge margins
    adaptive_drop: float = 0.1  # the adaptive weight at a tenth of its first logged value
    adversarial_max: float = 10.0  # non-saturating -log D(G(z)) = 10 means D(fake) ~ 5e-5
    patience: int = 5  # log intervals in a row; a single lopsided interval is normal GAN noise
    warned: bool = field(default=False, init=False)
    _streak: int = field(default=0, init=False)
    _since: Optional[int] = field(default=None, init=False)
    _first_adaptive: Optional[float] = field(default=None, init=False)

    def update(self, step: int, metrics: Mapping[str, float]) -> Optional[str]:
        """Feed one log interval's metrics; returns (and logs) the warning the first time, else None."""
        acc_real, acc_fake = metrics.get("d/acc_real"), metrics.get("d/acc_fake")
        logit_real, logit_fake = metrics.get("d/logits_real"), metrics.get("d/logits_fake")
        adv, adaptive = metrics.get("g/adversarial"), metrics.get("g/adaptive_weight")
        if adaptive is not None and self._first_adaptive is None and adaptive > 0:
            self._first_adaptive = adaptive
        reasons = []
        if acc_real is not None and acc_fake is not None and min(acc_real, acc_fake) >= self.accuracy_max:
            reasons.append(f"D accuracy on real {acc_real:.1%}, on fakes {acc_fake:.1%}")
        if logit_real is not None and logit_fake is not None and logit_real - logit_fake >= self.logit_gap_max:
            reasons.append(f"mean logit real {logit_real:.3g} vs fake {logit_fake:.3g} (gap >= {self.logit_gap_max:g})")
        if adaptive is not None and self._first_adaptive and adaptive < self.adaptive_drop * self._first_adaptive:
            reasons.append(f"adaptive weight {adaptive:.3g}, down from {self._first_adaptive:.3g}")
        if adv is not None and adv > self.adversarial_max:
            reasons.append(f"generator adversarial loss {adv:.3g}")
        if not reasons:
            self._streak, self._since = 0, None
            return None
        self._streak += 1
        self._since = step if self._since is None else self._since
        if self._streak < self.patience or self.warned:
            return None
        self.warned = True
        context = [f"{label} {metrics[key]:.3g}" for key, label in (
            ("d/logits_real", "mean logit real"), ("d/logits_fake", "mean logit fake"),
            ("g/adversarial", "generator adversarial loss"), ("d/total", "discriminator loss")) if key in metrics]
        message = (
            f"The discriminator has won at step {step}: for {self._streak} log intervals in a row (since step "
            f"{self._since}) {'; '.join(reasons)} ({', '.join(context)}). The generator gets almost no useful adversarial gradient. "
            "What brings it back (docs/training.md, 'Keeping the GAN in the game'): the lecam term on the "
            "discriminator (losses: + {name: lecam, weight: 0.1}), a lower optim_d.lr, a smaller discriminator "
            "(discriminator.options n_layers / base_width), r1 on reals, or a later adversarial start. "
            "This warning is shown once."
        )
        logger.warning(message)
        return message


def all_finite(modules: Iterable[Optional[nn.Module]]) -> bool:
    """True when every parameter and floating buffer of ``modules`` is finite (one host sync)."""
    flags: List[Tensor] = []
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                flags.append(torch.isfinite(t.detach()).all())
    return bool(torch.stack(flags).all()) if flags else True


# 0.5: the signal handling moved to the module of preemption (vaegan.preemption), which is what it serves.
__getattr__ = deprecated_names(__name__, {name: f"vaegan.preemption:{name}"
                                          for name in ("GracefulStop", "stopped", "EXIT_CODES", "CONTINUE")})
