"""The two-player Accelerate trainer.

Schedule of one micro-batch (one entry into ``accelerator.accumulate(generator, discriminator)``):

1. **One generator forward** through the prepared (DDP-wrapped, autocast) module:
   reconstruction, posterior, latent, and whatever extra decodes the terms asked for.
2. **Discriminator backward** (from ``adversarial.disc_start``): the discriminator judges real images
   and the *detached* reconstructions, so no gradient reaches the generator.
3. **Generator backward**: the discriminator is frozen (``requires_grad_(False)``) and called unwrapped
   (no gradient to synchronise, so no DDP bookkeeping), the generator's terms are summed with their
   scheduled weights.
4. **At the accumulation boundary, one update of both players**: gradients are unscaled once (fp16)
   and clipped; one fused finiteness check of the losses, the batch and both gradient norms (agreed by
   all processes; :class:`~vaegan.guards.StepGuard`) yields a device flag ``found_inf`` that the fused
   optimizers and the EMA read on the device: a NaN/inf step changes no weight for either player, with
   no host sync. Skipped steps are counted by the host at the log intervals.

Both gradients are computed at the same weights: the generator's adversarial gradient comes from the
discriminator as it was before this step's update (the order "generator step, then discriminator step
on the same detached fakes"); computing both before stepping either is what lets one check skip a bad
step for both players.

Each player's gradient therefore comes only from its own loss (no pythae-style accumulation of the
other player's loss, no diffusers-style leak of D gradients into the G step), DDP synchronises every
trainable parameter (loss-term parameters such as a learned log-variance are trained by, and
wrapped with, their player), and one grad scaler serves both optimizers in a fixed order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpointing import CheckpointManager, find_checkpoint, read_counters, restore
from .commands import preview_grids
from .config import ExperimentConfig, OptimConfig, to_dict
from .data import TensorImages, first_batch
from .errors import ConfigError, DataError, TrainingDiverged
from .evaluation import EvalResources, evaluate, prepare_evaluation
from .guards import CollapseMonitor, GracefulStop, StepGuard, all_finite, stopped
from .model import VAE, VAEOutput
from .objective import Objective, TermInputs
from .optim import WarmupEMA, build_optimizer, default_precision, step_unless
from .plots import write_loss_curves
from .tracking import Tracking

__all__ = ["Player", "TrainState", "Trainer"]

logger = logging.getLogger(__name__)


class Player(nn.Module):
    """One player of the game: its network plus the parameters of the loss terms it trains.

    Wrapping both in one module means ``prepare`` puts them under one DDP, so a learned
    log-variance is all-reduced like any weight, and one optimizer holds them all.
    """

    def __init__(self, net: nn.Module, terms: nn.ModuleDict) -> None:
        super().__init__()
        self.net = net
        self.terms = terms

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


@dataclass
class TrainState:
    """Counters that, with the weights, optimizers and RNG, make a resume exact."""

    step: int = 0  # optimizer steps taken (one skipped for NaN/inf included: it changed no weight)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    images_seen: int = 0  # across all processes
    skipped_steps: int = 0  # steps skipped for both players because a value was NaN/inf


class Trainer:
    """Trains a VAE (and optionally a discriminator) on a dataset with an objective.

    Components are built by the caller (see :func:`vaegan.build_trainer`) and injected here.

    Args:
        config: The run's configuration (its ``train``, ``optim_g`` and ``optim_d`` sections).
        model: The VAE (the generator).
        objective: Loss terms of both players.
        dataset: Items are (C, H, W) tensors in the model's output range (or (image, label)).
        discriminator: Required when the objective has discriminator terms.
        accelerator: Defaults to one built from ``config.train``.

    Raises:
        DataError: the data does not fit the model, or there is too little of it.
        ConfigError: inconsistent components.

    Example:
        >>> trainer = Trainer(cfg, VAE(cfg.model), Objective.from_config(cfg, 100), ds)  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, config: ExperimentConfig, model: VAE, objective: Objective, dataset: Dataset,
                 discriminator: Optional[nn.Module] = None, accelerator: Optional[Accelerator] = None) -> None:
        tc = config.train
        self.config = config
        if tc.tf32 and torch.cuda.is_available():  # fp32 matmuls and convs on tensor cores (Ampere+)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.accelerator = accelerator or Accelerator(
            mixed_precision=default_precision(tc.mixed_precision),
            gradient_accumulation_steps=tc.grad_accum,
            log_with=None if tc.report_to == "none" else tc.report_to,
            project_dir=tc.output_dir,
            step_scheduler_with_optimizer=False,  # schedules count optimizer updates, stepped by us
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tc.seed),
        )
        acc = self.accelerator
        if objective.needs_discriminator and discriminator is None:
            raise ConfigError("The objective has adversarial terms but no discriminator was given.")
        self.output_dir = Path(tc.output_dir)
        self._check_data(model, dataset, tc.batch_size * acc.num_processes)
        set_seed(tc.seed)

        workers = config.data.num_workers
        on_gpu = acc.device.type == "cuda"
        if isinstance(dataset, TensorImages) and on_gpu and workers == 0:
            dataset = dataset.to(acc.device)  # MNIST-size data lives on the GPU: batches are cut there
        streamed = not isinstance(dataset, TensorImages)  # decoded per item: workers, pinned memory, prefetch
        # A private generator: DataLoader.__iter__ otherwise draws a seed from the global RNG, which
        # would shift the reparameterisation noise after a mid-epoch resume.
        loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                            num_workers=workers, generator=torch.Generator().manual_seed(tc.seed),
                            pin_memory=on_gpu and streamed, persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None)
        batches = len(dataset) // (tc.batch_size * acc.num_processes)
        per_epoch = math.ceil(batches / tc.grad_accum)
        self.total_steps = min(tc.max_steps or per_epoch * tc.epochs, per_epoch * tc.epochs)
        objective.resolve(self.total_steps)  # schedules given as a fraction of training

        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
            if discriminator is not None:
                discriminator = discriminator.to(memory_format=torch.channels_last)
        gen = Player(model, objective.generator_terms)
        g_opt, g_sched = build_optimizer(gen.parameters(), config.optim_g, self.total_steps)
        self.objective = objective
        self.has_disc = discriminator is not None
        if self.has_disc:
            if acc.num_processes > 1 and acc.device.type == "cuda":
                # BatchNorm statistics would otherwise differ per rank (SyncBatchNorm needs a GPU).
                discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
            disc = Player(discriminator, objective.discriminator_terms)
            d_opt, d_sched = build_optimizer(disc.parameters(), config.optim_d, self.total_steps)
            (self.gen, self.disc, self.g_opt, self.d_opt, self.g_sched, self.d_sched, self.loader) = acc.prepare(
                gen, disc, g_opt, d_opt, g_sched, d_sched, loader)
            self.disc_net: nn.Module = acc.unwrap_model(self.disc).net
            # prepare() wraps forward in autocast; the D step enters accelerator.autocast() itself, and
            # without the wrapper a term (R1) can switch autocast off for an fp32 forward.
            d_player = acc.unwrap_model(self.disc)
            if hasattr(d_player, "_original_forward"):
                d_player.forward = d_player._original_forward
        else:
            self.gen, self.g_opt, self.g_sched, self.loader = acc.prepare(gen, g_opt, g_sched, loader)
        self.model: VAE = acc.unwrap_model(self.gen).net
        self.ema = None
        if tc.ema_decay is not None:
            self._ema_update = WarmupEMA(tc.ema_decay)
            self.ema = AveragedModel(self.model, multi_avg_fn=self._ema_update, use_buffers=True)
        if tc.compile:  # in place, after the EMA copy: state_dict keys and checkpoints stay as they are
            self.model.compile(backend=tc.compile)
            if self.has_disc:
                self.disc_net.compile(backend=tc.compile)
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.output_dir, tc.checkpoints_total_limit)
        self.guard = StepGuard(tc.max_nonfinite_steps, acc, fp16_scaler=acc.scaler is not None)
        self.collapse = CollapseMonitor()
        self._pending: List[Tuple[str, Tensor]] = []  # this step's metrics, recorded unless it is skipped
        self.history: List[Dict[str, float]] = []
        self._sums: Dict[str, Tensor] = {}  # key -> sum over applied steps (device)
        self._counts: Dict[str, Tensor] = {}  # key -> applied steps recorded (device)
        self.tracking = Tracking(acc, tc.project, self.output_dir)  # W&B / TensorBoard; never stops training
        self._eval: Optional[EvalResources] = None
        self._last_eval, self._last_results = -1, {}
        if config.eval.every:  # load the split (and classifier) now: missing data fails before training
            self._eval = prepare_evaluation(config.data, model.config, config.eval, accelerator=acc)

    # ---- set-up ----------------------------------------------------------------------------------
    def _check_data(self, model: VAE, dataset: Dataset, global_batch: int) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise DataError("The dataset is empty; point the data section at a folder or split with images.")
        if n < global_batch:
            raise DataError(
                f"The dataset has {n} images but one step needs {global_batch} (batch_size x processes). "
                "Lower train.batch_size or add data."
            )
        # 64 images spread over the whole dataset, not only its first batch: a bad file in the middle is
        # refused now rather than found at step 40,000.
        items = [dataset[i] for i in torch.linspace(0, n - 1, min(n, 64)).round().long().unique().tolist()]
        model.check_images(torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]), "the dataset")

    @property
    def ema_model(self) -> VAE:
        """The EMA generator (or the raw one when EMA is off), for sampling."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    # ---- one micro-batch ---------------------------------------------------------------------------
    def _micro_step(self, x: Tensor) -> None:
        if self.config.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.gen(x, **self.objective.forward_kwargs(x.shape[0]))  # the one generator forward (DDP + autocast)
        self.guard.watch("input pixels", x)
        d_active = self.has_disc and self.objective.discriminator_active(self.state.step)
        if d_active:
            d_loss, d_parts, d_in = self.discriminator_backward(x, out)
            self.guard.watch("d loss", d_loss)
            self._record_parts("d", d_loss, d_parts, d_in)
        g_loss, g_parts = self.generator_backward(x, out)
        self.guard.watch("g loss", g_loss)
        self._record_parts("g", g_loss, g_parts)
        if self.accelerator.sync_gradients:  # the accumulation boundary
            found_inf = self._update(d_active)
            if self.ema is not None:
                self._ema_update.skip = found_inf
                self.ema.update_parameters(self.model)

    def discriminator_backward(self, x: Tensor, out: VAEOutput) -> Tuple[Tensor, Dict[str, Tensor], TermInputs]:
        """Backward of the discriminator's loss on real ``x`` and the detached reconstructions."""
        self.disc_net.requires_grad_(True)
        with self.accelerator.autocast():
            inputs = TermInputs(real=x, output=out, step=self.state.step, value_range=self.model.value_range,
                                fake=self.objective.fakes(out, for_discriminator=True), discriminator=self.disc)
            loss, parts = self.objective.discriminator_loss(inputs)
        self.accelerator.backward(loss)
        return loss, parts, inputs

    def generator_backward(self, x: Tensor, out: VAEOutput) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Backward of the generator's loss; the discriminator is frozen throughout."""
        uses_d = self.has_disc and self.objective.generator_uses_discriminator(self.state.step)
        if self.has_disc:
            self.disc_net.requires_grad_(False)  # G's backward must leave no gradient in D
        try:
            with self.accelerator.autocast():
                inputs = TermInputs(real=x, output=out, step=self.state.step, value_range=self.model.value_range,
                                    fake=self.objective.fakes(out, for_discriminator=False),
                                    discriminator=self.disc_net if uses_d else None, last_layer=self.model.last_layer)
                loss, parts = self.objective.generator_loss(inputs)
            self.accelerator.backward(loss)
        finally:
            if self.has_disc:
                self.disc_net.requires_grad_(True)
        return loss, parts

    def _update(self, d_active: bool) -> Tensor:
        """Clip both players, then apply both updates or, if anything is NaN/inf, neither; returns the
        guard's ``found_inf`` (device tensor, 1.0 for a skipped step)."""
        acc = self.accelerator
        sides = [("d", self.disc, self.d_opt, self.d_sched, self.config.optim_d)] if d_active else []
        sides.append(("g", self.gen, self.g_opt, self.g_sched, self.config.optim_g))
        acc.unscale_gradients()  # fp16: once for both optimizers (a second unscale raises); else a no-op
        norms = {f"grad_norm/{side}": self._clip(player, cfg) for side, player, _, _, cfg in sides}
        found_inf = self.guard.check(norms, self.state.step + 1)  # device flag, agreed by all processes
        keep = 1.0 - found_inf
        for key, value in [*self._pending, *norms.items()]:
            self._record(key, value, keep)
        for _, _, opt, sched, _ in sides:
            step_unless(opt.optimizer, found_inf)  # the gradients are unscaled (fp16) and clipped already
            sched.step()  # schedules count optimizer steps, skipped ones included (the host cannot know)
        if acc.scaler is not None:
            acc.scaler.update()  # once per step, on the device; lowers the loss scale after an overflow
        self._pending = []
        for _, _, opt, _, _ in sides:
            opt.zero_grad(set_to_none=True)
        return found_inf

    def _clip(self, player: nn.Module, cfg: OptimConfig) -> Tensor:
        max_norm = float("inf") if cfg.grad_clip is None else cfg.grad_clip  # inf: still report the norm
        if self.accelerator.scaler is not None:  # unscaled in _update; Accelerate's clip would unscale again
            return torch.nn.utils.clip_grad_norm_(player.parameters(), max_norm)
        return self.accelerator.clip_grad_norm_(player.parameters(), max_norm)

    # ---- metrics (device tensors; the host syncs only at log intervals) ------------------------
    def _record(self, key: str, value: Tensor, keep: Tensor) -> None:
        # keep: 1.0 for an applied step, 0.0 for a skipped one, whose (maybe NaN) values are left out.
        v = torch.where(keep > 0, value.detach().float().reshape(()), 0.0)
        self._sums[key] = self._sums[key] + v if key in self._sums else v
        self._counts[key] = self._counts[key] + keep if key in self._counts else keep

    def _record_parts(self, side: str, total: Tensor, parts: Dict[str, Tensor], inputs: Optional[TermInputs] = None) -> None:
        # Staged in self._pending; _update records them masked by the guard's verdict.
        self._pending += [(f"{side}/total", total.detach()), *((f"{side}/{k}", v.detach()) for k, v in parts.items())]
        if inputs is not None:  # mean discriminator logits and accuracy (logit > 0 means "real")
            for which, out in inputs.computed().items():
                logits = out.logits.detach().float()
                self._pending.append((f"d/logits_{which}", logits.mean()))
                if which in ("real", "fake"):
                    self._pending.append((f"d/acc_{which}", ((logits > 0) == (which == "real")).float().mean()))

    def _flush_metrics(self, seconds: float, images: int) -> Dict[str, float]:
        keys = sorted(self._sums)
        sums = torch.stack([self._sums[k] for k in keys]) if keys else torch.zeros(0)
        counts = torch.stack([self._counts[k] for k in keys]) if keys else torch.zeros(0)
        # Every process applies or skips the same steps, so the counts agree and a mean of means is exact.
        means = self.accelerator.reduce((sums / counts).to(self.accelerator.device), "mean")
        # A key whose every step was skipped is 0/0 = NaN: left out (a NaN never reaches metrics.jsonl).
        metrics = {k: float(v) for k, v in zip(keys, means.tolist()) if math.isfinite(v)}
        for key in self.objective.schedules:
            metrics[f"weight/{key}"] = self.objective.weight(key, self.state.step)
        metrics["lr/g"] = self.g_sched.get_last_lr()[0]
        if self.has_disc:
            metrics["lr/d"] = self.d_sched.get_last_lr()[0]
        metrics["images_per_sec"] = images / max(seconds, 1e-9)
        metrics["epoch"] = self.state.epoch
        self._sums, self._counts = {}, {}
        return metrics

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train until ``max_steps`` or ``epochs``; returns ``<output-dir>/final``.

        On SIGINT/SIGTERM a checkpoint is written at the end of the current step and the process exits
        with status 130/143 (``SystemExit``); ``train.resume=latest`` continues from it.

        Raises:
            CheckpointError: ``train.resume`` names no usable checkpoint.
            TrainingDiverged: ``train.max_nonfinite_steps`` steps in a row were NaN/inf.
        """
        with GracefulStop(self.guard.request_stop):
            return self._fit()

    def _fit(self) -> Path:
        acc, tc = self.accelerator, self.config.train
        if tc.resume:
            self.load_checkpoint(find_checkpoint(self.output_dir, tc.resume))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
            fixed = first_batch(self.loader.dataset, tc.num_samples)
            self._fixed_real = fixed.to(acc.device)
            self._fixed_noise = torch.randn(tc.num_samples, self.model.config.latent_dim,
                                            generator=torch.Generator().manual_seed(tc.seed)).to(acc.device)
        logger.info("Training %d steps with mixed precision %s on %d process(es) (%s), %d images per step",
                    self.total_steps, acc.mixed_precision, acc.num_processes, acc.device,
                    tc.batch_size * acc.num_processes * tc.grad_accum)
        self.tracking.start(self.config)
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_local_main_process, desc="train")
        t0, images0 = time.perf_counter(), self.state.images_seen
        last_saved = self.state.step if tc.resume else -1  # a resumed run starts from a saved state
        while self.state.step < self.total_steps and self.state.epoch < tc.epochs:
            self.loader.set_epoch(self.state.epoch)
            batches = self.loader
            if self.state.batch_in_epoch:
                batches = acc.skip_first_batches(self.loader, self.state.batch_in_epoch)
            for batch in batches:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                with acc.accumulate(self.gen, *( [self.disc] if self.has_disc else [])):
                    self._micro_step(x)
                self.state.batch_in_epoch += 1
                self.state.images_seen += x.shape[0] * acc.num_processes
                if not acc.sync_gradients:  # mid-accumulation
                    self._stop_if_asked(last_saved)
                    continue
                self.state.step += 1  # an optimizer step, applied or (NaN/inf) skipped: only the device knows yet
                bar.update(1)
                step = self.state.step
                if step % tc.log_every == 0 or step == self.total_steps:
                    self._sync_guard()  # the host reads the guard's counters here, not at every step
                    metrics = self._flush_metrics(time.perf_counter() - t0, self.state.images_seen - images0)
                    metrics["skipped_steps"] = self.state.skipped_steps
                    if acc.is_main_process:
                        self.collapse.update(step, metrics)  # warns on discriminator domination
                    t0, images0 = time.perf_counter(), self.state.images_seen
                    self._log(metrics, bar)
                if tc.sample_every and step % tc.sample_every == 0:
                    self.write_images(f"step_{step:08d}")
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = step
                if self.config.eval.every and step % self.config.eval.every == 0:
                    self.evaluate()
                self._stop_if_asked(last_saved)
                if step >= self.total_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                continue
            break
        bar.close()
        if last_saved != self.state.step:
            self.save_checkpoint()
        return self._finish()

    def _sync_guard(self) -> None:
        """Count the skipped steps since the last sync (raises TrainingDiverged after too many in a row)."""
        self.state.skipped_steps += self.guard.sync(self.state.step)

    def _stop_if_asked(self, last_saved: int) -> None:
        if self.guard.stop_agreed:  # SIGINT/SIGTERM reached some process: checkpoint this step, then exit
            if last_saved != self.state.step:
                self.save_checkpoint()
            self.tracking.finish()
            raise stopped(self.guard.stop_signal, self.state.step)

    def _log(self, metrics: Dict[str, float], bar: tqdm) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            record = {"step": self.state.step, **metrics}
            self.history.append(record)
            with open(self.output_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("g/total", "d/total", "images_per_sec")})
        self.tracking.log(metrics, self.state.step)

    def _finish(self) -> Path:
        acc = self.accelerator
        final = self.output_dir / "final"
        if self.config.eval.every:
            results = self.evaluate() if self._last_eval != self.state.step else self._last_results
            if acc.is_main_process:
                final.mkdir(parents=True, exist_ok=True)
                (final / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.ema_model.save_pretrained(final)
            if self.ema is not None:
                self.model.save_pretrained(final / "raw")
            (final / "training_config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
            self.write_images("final")
            if self.config.train.plot_loss_curves:
                write_loss_curves(self.output_dir)  # loss_curves.png; warns instead of raising
        self.tracking.finish()  # not end_training(): that also destroys the process group
        acc.wait_for_everyone()
        return final

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, object]:
        """Evaluate the EMA generator (``eval.ema``) with the ``eval`` config on every process.

        Scalars go to the trackers as ``eval/<metric>`` and every result, with its step, is appended to
        ``<output_dir>/eval.jsonl``. Every process must call this (the metric states are reduced).
        """
        ec = self.config.eval
        self._sync_guard()  # no evaluation of a diverged run
        if self._eval is None:
            self._eval = prepare_evaluation(self.config.data, self.model.config, ec, accelerator=self.accelerator)
        model = self.ema_model if ec.ema else self.model
        t0 = time.perf_counter()
        results = evaluate(model, self._eval.data, ec, resources=self._eval, accelerator=self.accelerator)
        logger.info("Evaluation at step %d took %.1f s: %s", self.state.step, time.perf_counter() - t0,
                    ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float)))
        if self.accelerator.is_main_process:
            with open(self.output_dir / "eval.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.state.step, **results}) + "\n")
        self.tracking.log({f"eval/{k}": float(v) for k, v in results.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}, self.state.step)
        self._last_eval, self._last_results = self.state.step, results
        return results

    # ---- images ------------------------------------------------------------------------------------
    def write_images(self, name: str) -> None:
        """Write real | reconstruction pairs, prior samples and interpolation strips of the EMA
        generator as ``samples/<name>_<panel>.png``, and log the same panels to the trackers."""
        if not self.accelerator.is_main_process:
            return
        from torchvision.utils import save_image

        grids = preview_grids(self.ema_model, self._fixed_real, self._fixed_noise)
        out = self.output_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        for key, grid in grids.items():
            save_image(grid, out / f"{name}_{key}.png")
        self.tracking.log_images(grids, self.state.step)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a complete, resumable checkpoint (every process must call this).

        Raises:
            TrainingDiverged: too many skipped steps in a row, or the weights are not finite (the existing
                checkpoints are kept).
        """
        self._sync_guard()  # the saved counters include every skipped step
        if not all_finite([self.gen, self.disc if self.has_disc else None, self.ema]):
            raise TrainingDiverged(
                f"Refusing to save step {self.state.step}: the weights contain NaN or inf. The checkpoints already "
                f"under {self.checkpoints.root} are kept; resume from the newest with lower learning rates.")
        extra = {"trainer_state.json": lambda p: p.write_text(json.dumps(asdict(self.state)))}
        if self.ema is not None:
            ema_state = {k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}
            extra["ema.safetensors"] = lambda p: save_file(ema_state, str(p))
        extra["config.yaml"] = lambda p: p.write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
        return self.checkpoints.save(self.accelerator, self.state.step, extra, {"epoch": self.state.epoch})

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizers, schedulers, scaler, RNG, EMA and counters from ``path``.

        Every file is checked first (safetensors headers, ``weights_only`` pickles, shapes), and the live
        objects are put back if the load still fails: a failed resume never leaves a half-loaded trainer.

        Raises:
            CheckpointError: naming the file that is missing, corrupt, unsafe or from another architecture.
        """
        path = Path(path)
        state = TrainState(**read_counters(path / "trainer_state.json", list(asdict(TrainState()))))
        extra = {"ema.safetensors": self.ema} if self.ema is not None and (path / "ema.safetensors").is_file() else {}
        if self.ema is not None and not extra:
            logger.warning("%s has no EMA weights; the EMA restarts from the current weights.", path)
        both = self.has_disc  # Accelerate's prepare order: generator first
        restore(self.accelerator, path, [self.gen, self.disc] if both else [self.gen],
                [self.g_opt, self.d_opt] if both else [self.g_opt], [self.g_sched, self.d_sched] if both else [self.g_sched],
                extra)
        self.state = state
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                    self.state.epoch, self.state.batch_in_epoch)

