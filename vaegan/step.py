"""One training step of both players: the whole two-player game for a micro-batch, in one place.

:class:`TrainStep` is called once per micro-batch (inside ``accelerator.accumulate``, entered once for
both players) and does, in this order:

1. **One generator forward** through the prepared (DDP-wrapped, autocast) module: reconstruction,
   posterior, latent, and whatever extra decodes the terms asked for.
2. **Discriminator backward** (from ``adversarial.disc_start``): the discriminator judges real images
   and the *detached* fakes, so no gradient reaches the generator.
3. **Generator backward**: the discriminator is frozen (``requires_grad_(False)``) and called unwrapped
   (no gradient to synchronise, so no DDP bookkeeping); the generator's terms are summed with their
   scheduled weights.
4. **At the accumulation boundary, one update of both players**: gradients are unscaled once (fp16)
   and clipped; one fused finiteness check of the losses, the batch and both gradient norms (agreed by
   all processes; :class:`~vaegan.guards.StepGuard`) yields a device flag ``found_inf`` that the fused
   optimizers and the EMA read on the device: a NaN/inf step changes no weight of either player, with
   no host sync. Then the EMA of the generator.

Both gradients are computed at the same weights: the generator's adversarial gradient comes from the
discriminator as it was before this step's update, which is what lets one check skip a bad step for
both players. Each player's gradient comes only from its own loss (no pythae-style accumulation of the
other player's loss, no diffusers-style leak of D gradients into the G step); DDP synchronises every
trainable parameter (loss-term parameters such as a learned log-variance are trained by, and wrapped
with, their player); one grad scaler serves both optimizers in a fixed order.

The step returns its metrics as device tensors and does no I/O: logging, images, checkpoints and
evaluation are the trainer's (:mod:`vaegan.trainer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.profiler import record_function

from . import _compat
from .api import VAE, TermInputs, VAEOutput
from .config import OptimConfig, TrainConfig
from .errors import ConfigError
from .guards import StepGuard
from .objective import Objective
from .optim import step_unless

__all__ = ["PlayerModule", "Trainable", "StepOutput", "TrainStep", "RunningMeans"]


class PlayerModule(nn.Module):
    """One player of the game as Accelerate prepares it: its network plus the parameters of the loss
    terms it trains.

    Wrapping both in one module means ``prepare`` puts them under one DDP, so a learned log-variance is
    all-reduced like any weight, one optimizer holds them all, and one file of a checkpoint saves them
    (``net.*`` and ``terms.*``).
    """

    def __init__(self, net: nn.Module, terms: nn.ModuleDict) -> None:
        super().__init__()
        self.net = net
        self.terms = terms

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)


@dataclass
class Trainable:
    """One player as the step trains it: its prepared module, optimizer, LR schedule and settings."""

    module: nn.Module  # the prepared (possibly DDP-wrapped) PlayerModule
    optimizer: Any  # the prepared optimizer (Accelerate's wrapper around torch's)
    scheduler: Any  # stepped once per optimizer step
    config: OptimConfig  # grad_clip and the rest


@dataclass
class StepOutput:
    """What one optimizer step of both players produced. Every value is a device tensor: reading one on
    the host waits for the device, so the trainer reads them only at log intervals."""

    metrics: Dict[str, Tensor]  # "g/<term>", "d/<term>", "d/logits_*", "grad_norm/*": means over the micro-batches
    found_inf: Tensor  # 0-dim; 1.0 when the step was skipped for both players (NaN/inf somewhere)


class TrainStep:
    """The two-player step: call it with each micro-batch; it returns a :class:`StepOutput` at every
    accumulation boundary (an optimizer step of both players) and None in between.

    Args:
        accelerator: The run's Accelerator (``prepare`` already done).
        objective: Loss terms of both players.
        generator: The generator player (its ``module.net`` is a :class:`~vaegan.api.VAE`).
        discriminator: The discriminator player; None for a plain VAE.
        guard: Decides on the device whether a step is applied.
        ema: An ``AveragedModel`` of the generator whose ``multi_avg_fn`` is a
            :class:`~vaegan.optim.WarmupEMA`, updated after every step; None for no EMA.
        channels_last: Feed the players NHWC batches.

    Raises:
        ConfigError: the objective has discriminator terms but no discriminator was given.

    Example:
        >>> out = None
        >>> for x in loader:  # doctest: +SKIP
        ...     out = step(x, state.step) or out
    """

    def __init__(self, accelerator: Any, objective: Objective, generator: Trainable,
                 discriminator: Optional[Trainable] = None, guard: Optional[StepGuard] = None,
                 ema: Optional[AveragedModel] = None, channels_last: bool = False) -> None:
        if objective.needs_discriminator and discriminator is None:
            raise ConfigError("The objective has adversarial terms but no discriminator was given.")
        self.accelerator = accelerator
        self.objective = objective
        self.generator = generator
        self.discriminator = discriminator
        self.guard = guard or StepGuard(TrainConfig.max_nonfinite_steps, accelerator,  # the config's default
                                        fp16_scaler=accelerator.scaler is not None)
        self.ema = ema
        self.channels_last = channels_last
        self.model: VAE = accelerator.unwrap_model(generator.module).net
        self.disc_net: Optional[nn.Module] = None
        if discriminator is not None:
            d_player = accelerator.unwrap_model(discriminator.module)
            self.disc_net = d_player.net
            # prepare() wraps forward in autocast; the D step enters accelerator.autocast() itself, and
            # without the wrapper a term (R1) can switch autocast off for an fp32 forward.
            _compat.plain_forward(d_player)
        self._pending: List[Tuple[str, Tensor]] = []  # this step's metrics, from every micro-batch

    # ---- the step --------------------------------------------------------------------------------
    def __call__(self, x: Tensor, step: int) -> Optional[StepOutput]:
        """Train on micro-batch ``x`` (B, C, H, W) at optimizer step ``step``; update both players at the
        accumulation boundary and return what the update produced (None mid-accumulation)."""
        acc, disc = self.accelerator, self.discriminator
        with acc.accumulate(self.generator.module, *([disc.module] if disc is not None else [])):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.generator.module(x, **self.objective.forward_kwargs(x.shape[0]))  # the one generator forward
            self.guard.watch("input pixels", x)
            d_active = disc is not None and self.objective.discriminator_active(step)
            if d_active:
                d_loss, d_parts, d_in = self.discriminator_backward(x, out, step)
                self.guard.watch("d loss", d_loss)
                self._stage("d", d_loss, d_parts, d_in)
            g_loss, g_parts = self.generator_backward(x, out, step)
            self.guard.watch("g loss", g_loss)
            self._stage("g", g_loss, g_parts)
            if not acc.sync_gradients:  # mid-accumulation: the gradients keep adding up
                return None
            return self.update(d_active, step)

    def discriminator_backward(self, x: Tensor, out: VAEOutput, step: int) -> Tuple[Tensor, Dict[str, Tensor], TermInputs]:
        """Backward of the discriminator's loss on real ``x`` and the detached fakes.

        Returns:
            (total loss, its unweighted parts, the inputs the terms read).
        """
        if self.discriminator is None or self.disc_net is None:
            raise RuntimeError("discriminator_backward needs a discriminator; this step has none")
        self.disc_net.requires_grad_(True)
        with self.accelerator.autocast():
            inputs = TermInputs(real=x, output=out, step=step, value_range=self.model.value_range,
                                fake=self.objective.fakes(out, for_discriminator=True),
                                discriminator=self.discriminator.module)
            loss, parts = self.objective.discriminator_loss(inputs)
        self.accelerator.backward(loss)
        return loss, parts, inputs

    def generator_backward(self, x: Tensor, out: VAEOutput, step: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Backward of the generator's loss; the discriminator is frozen throughout.

        Returns:
            (total loss, its unweighted parts).
        """
        net = self.disc_net
        uses_d = net is not None and self.objective.generator_uses_discriminator(step)
        if net is not None:
            net.requires_grad_(False)  # G's backward must leave no gradient in D
        try:
            with self.accelerator.autocast():
                inputs = TermInputs(real=x, output=out, step=step, value_range=self.model.value_range,
                                    fake=self.objective.fakes(out, for_discriminator=False),
                                    discriminator=net if uses_d else None, last_layer=self.model.last_layer)
                loss, parts = self.objective.generator_loss(inputs)
            self.accelerator.backward(loss)
        finally:
            if net is not None:
                net.requires_grad_(True)
        return loss, parts

    def update(self, d_active: bool, step: int) -> StepOutput:
        """Clip both players, then apply both updates or, if anything is NaN/inf, neither; then the EMA.

        Args:
            d_active: Whether the discriminator trained in this step.
            step: The optimizer step being taken (its index before the update).
        """
        with record_function("vaegan/update"):  # a profiler range; costs nothing without a profiler
            acc = self.accelerator
            sides = [("d", self.discriminator)] if d_active else []
            sides.append(("g", self.generator))
            acc.unscale_gradients()  # fp16: once for both optimizers (a second unscale raises); else a no-op
            norms = {f"grad_norm/{side}": self._clip(player) for side, player in sides}  # type: ignore[arg-type]
            found_inf = self.guard.check(norms, step + 1)  # device flag, agreed by all processes
            for _, player in sides:
                step_unless(player.optimizer.optimizer, found_inf)  # gradients are unscaled (fp16) and clipped
                player.scheduler.step()  # schedules count optimizer steps, skipped ones included (the host cannot know)
            if acc.scaler is not None:
                acc.scaler.update()  # once per step, on the device; lowers the loss scale after an overflow
            for _, player in sides:
                player.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.multi_avg_fn.skip = found_inf  # a skipped step leaves the EMA as it was
                self.ema.update_parameters(self.model)
            metrics = self._metrics([*self._pending, *norms.items()])
            self._pending = []
        return StepOutput(metrics, found_inf)

    # ---- helpers -------------------------------------------------------------------------------------
    def _clip(self, player: Trainable) -> Tensor:
        cfg = player.config
        max_norm = float("inf") if cfg.grad_clip is None else cfg.grad_clip  # inf: still report the norm
        if self.accelerator.scaler is not None:  # unscaled in update(); Accelerate's clip would unscale again
            return torch.nn.utils.clip_grad_norm_(player.module.parameters(), max_norm)
        return self.accelerator.clip_grad_norm_(player.module.parameters(), max_norm)

    def _stage(self, side: str, total: Tensor, parts: Dict[str, Tensor], inputs: Optional[TermInputs] = None) -> None:
        self._pending += [(f"{side}/total", total.detach()), *((f"{side}/{k}", v.detach()) for k, v in parts.items())]
        if inputs is not None:  # mean discriminator logits and accuracy (logit > 0 means "real")
            for which, out in inputs.computed().items():
                logits = out.logits.detach().float()
                self._pending.append((f"d/logits_{which}", logits.mean()))
                if which in ("real", "fake"):
                    self._pending.append((f"d/acc_{which}", ((logits > 0) == (which == "real")).float().mean()))

    @staticmethod
    def _metrics(pairs: List[Tuple[str, Tensor]]) -> Dict[str, Tensor]:
        """Key -> 0-dim fp32 value, the mean over micro-batches when a key came several times."""
        grouped: Dict[str, List[Tensor]] = {}
        for key, value in pairs:
            grouped.setdefault(key, []).append(value.detach().float().reshape(()))
        return {k: v[0] if len(v) == 1 else torch.stack(v).mean() for k, v in grouped.items()}

    def players(self) -> List[nn.Module]:
        """The prepared player modules in ``prepare`` order (generator first): what a checkpoint saves."""
        return [self.generator.module] + ([self.discriminator.module] if self.discriminator is not None else [])


class RunningMeans:
    """Per-key means of step metrics kept on the device; a skipped step's (maybe NaN) values are left out.

    Example:
        >>> means = RunningMeans()
        >>> means.add({"g/total": torch.tensor(2.0)}, found_inf=torch.tensor(0.0))
        >>> means.add({"g/total": torch.tensor(float("nan"))}, found_inf=torch.tensor(1.0))
        >>> means.compute(accelerator=None)
        {'g/total': 2.0}
    """

    def __init__(self) -> None:
        self._sums: Dict[str, Tensor] = {}
        self._counts: Dict[str, Tensor] = {}

    def add(self, metrics: Dict[str, Tensor], found_inf: Tensor) -> None:
        """Add one step's 0-dim metrics; ``found_inf`` 1.0 marks a skipped step (no host read)."""
        keep = 1.0 - found_inf
        for key, value in metrics.items():
            v = torch.where(keep > 0, value, 0.0)
            self._sums[key] = self._sums[key] + v if key in self._sums else v
            self._counts[key] = self._counts[key] + keep if key in self._counts else keep

    def compute(self, accelerator: Any) -> Dict[str, float]:
        """The means since the last call, averaged over processes (the host read); then starts over.

        A key whose every step was skipped is 0/0 = NaN and is left out: a NaN never reaches the logs.
        """
        keys = sorted(self._sums)
        if not keys:
            return {}
        means = torch.stack([self._sums[k] for k in keys]) / torch.stack([self._counts[k] for k in keys])
        if accelerator is not None:  # every process applies or skips the same steps: a mean of means is exact
            means = accelerator.reduce(means.to(accelerator.device), "mean")
        self._sums, self._counts = {}, {}
        return {k: float(v) for k, v in zip(keys, means.tolist()) if math.isfinite(v)}
