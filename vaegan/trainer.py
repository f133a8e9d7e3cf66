"""The two-player Accelerate trainer.

Schedule of one micro-batch (one entry into ``accelerator.accumulate(generator, discriminator)``):

1. **One generator forward** through the prepared (DDP-wrapped, autocast) module:
   reconstruction, posterior, latent, and whatever extra decodes the terms asked for.
2. **Discriminator step** (from ``adversarial.disc_start``): the discriminator judges real images and
   the *detached* reconstructions, so no gradient reaches the generator; backward; at the
   accumulation boundary clip, step and zero the discriminator's optimizer.
3. **Generator step**: the discriminator is frozen (``requires_grad_(False)``) and called unwrapped
   (no gradient to synchronise, so no DDP bookkeeping), the generator's terms are summed with their
   scheduled weights; backward; clip, step, zero; the EMA is updated.

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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpointing import CheckpointManager, find_checkpoint
from .config import ExperimentConfig, OptimConfig, to_dict
from .data import first_batch
from .errors import CheckpointError, ConfigError, DataError
from .model import VAE, VAEOutput
from .objective import Objective, TermInputs

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

    step: int = 0  # optimizer updates done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    images_seen: int = 0  # across all processes


def _optimizer(params, cfg: OptimConfig, total_steps: int):
    params = [p for p in params if p.requires_grad]
    # foreach: one fused kernel per parameter group instead of one per tensor.
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
        self.accelerator = accelerator or Accelerator(
            mixed_precision=tc.mixed_precision,
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

        # A private generator: DataLoader.__iter__ otherwise draws a seed from the global RNG, which
        # would shift the reparameterisation noise after a mid-epoch resume.
        loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                            num_workers=config.data.num_workers, generator=torch.Generator().manual_seed(tc.seed))
        batches = len(dataset) // (tc.batch_size * acc.num_processes)
        per_epoch = math.ceil(batches / tc.grad_accum)
        self.total_steps = min(tc.max_steps or per_epoch * tc.epochs, per_epoch * tc.epochs)
        objective.resolve(self.total_steps)  # schedules given as a fraction of training

        gen = Player(model, objective.generator_terms)
        g_opt, g_sched = _optimizer(gen.parameters(), config.optim_g, self.total_steps)
        self.objective = objective
        self.has_disc = discriminator is not None
        if self.has_disc:
            disc = Player(discriminator, objective.discriminator_terms)
            d_opt, d_sched = _optimizer(disc.parameters(), config.optim_d, self.total_steps)
            (self.gen, self.disc, self.g_opt, self.d_opt, self.g_sched, self.d_sched, self.loader) = acc.prepare(
                gen, disc, g_opt, d_opt, g_sched, d_sched, loader)
            self.disc_net: nn.Module = acc.unwrap_model(self.disc).net
        else:
            self.gen, self.g_opt, self.g_sched, self.loader = acc.prepare(gen, g_opt, g_sched, loader)
        self.model: VAE = acc.unwrap_model(self.gen).net
        self.ema = None
        if tc.ema_decay is not None:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.output_dir, tc.checkpoints_total_limit)
        self.history: List[Dict[str, float]] = []
        self._sums: Dict[str, Tensor] = {}
        self._counts: Dict[str, int] = {}

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
        model.check_images(first_batch(dataset, 8), "the dataset")

    @property
    def ema_model(self) -> VAE:
        """The EMA generator (or the raw one when EMA is off), for sampling."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    # ---- one micro-batch ---------------------------------------------------------------------------
    def _micro_step(self, x: Tensor) -> None:
        out = self.gen(x, **self.objective.forward_kwargs(x.shape[0]))  # the one generator forward (DDP + autocast)
        if self.has_disc and self.objective.discriminator_active(self.state.step):
            d_loss, d_parts, d_in = self.discriminator_backward(x, out)
            self._update("d", self.disc, self.d_opt, self.d_sched, self.config.optim_d)
            self._record_parts("d", d_loss, d_parts, d_in)
        g_loss, g_parts = self.generator_backward(x, out)
        self._update("g", self.gen, self.g_opt, self.g_sched, self.config.optim_g)
        self._record_parts("g", g_loss, g_parts)

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

    def _update(self, side: str, player: nn.Module, opt, sched, cfg: OptimConfig) -> None:
        # AcceleratedOptimizer.step/zero_grad are no-ops between accumulation boundaries.
        if self.accelerator.sync_gradients:
            self._record(f"grad_norm/{side}", self._clip(player, cfg))
        opt.step()
        if self.accelerator.sync_gradients:
            sched.step()
        opt.zero_grad(set_to_none=True)

    def _clip(self, player: nn.Module, cfg: OptimConfig) -> Tensor:
        if cfg.grad_clip is None:  # still report the norm
            return self.accelerator.clip_grad_norm_(player.parameters(), float("inf"))
        return self.accelerator.clip_grad_norm_(player.parameters(), cfg.grad_clip)

    # ---- metrics (device tensors; the host syncs only at log intervals) ------------------------
    def _record(self, key: str, value: Tensor) -> None:
        v = value.detach().float().reshape(())
        self._sums[key] = self._sums[key] + v if key in self._sums else v
        self._counts[key] = self._counts.get(key, 0) + 1

    def _record_parts(self, side: str, total: Tensor, parts: Dict[str, Tensor], inputs: Optional[TermInputs] = None) -> None:
        self._record(f"{side}/total", total)
        for key, value in parts.items():
            self._record(f"{side}/{key}", value)
        if inputs is not None:  # mean discriminator logits, when the terms computed them
            for which, out in inputs.computed().items():
                self._record(f"d/logits_{which}", out.logits.float().mean())

    def _flush_metrics(self, seconds: float, images: int) -> Dict[str, float]:
        keys = sorted(self._sums)
        sums = torch.stack([self._sums[k] for k in keys]) if keys else torch.zeros(0)
        means = sums / torch.tensor([self._counts[k] for k in keys], dtype=sums.dtype, device=sums.device)
        means = self.accelerator.reduce(means.to(self.accelerator.device), "mean")  # average over ranks
        metrics = {k: float(v) for k, v in zip(keys, means.tolist())}
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

        Raises:
            CheckpointError: ``train.resume`` names no usable checkpoint.
        """
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
        if acc.log_with:
            acc.init_trackers(tc.project, config=_flatten(to_dict(self.config)))
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_local_main_process, desc="train")
        t0, images0 = time.perf_counter(), self.state.images_seen
        last_saved = -1
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
                if not acc.sync_gradients:
                    continue
                self.state.step += 1
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                bar.update(1)
                step = self.state.step
                if step % tc.log_every == 0 or step == self.total_steps:
                    metrics = self._flush_metrics(time.perf_counter() - t0, self.state.images_seen - images0)
                    t0, images0 = time.perf_counter(), self.state.images_seen
                    self._log(metrics, bar)
                if tc.sample_every and step % tc.sample_every == 0:
                    self.write_images(f"step_{step:08d}")
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = step
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

    def _log(self, metrics: Dict[str, float], bar: tqdm) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            record = {"step": self.state.step, **metrics}
            self.history.append(record)
            with open(self.output_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("g/total", "d/total", "images_per_sec")})
        if acc.log_with:
            acc.log(metrics, step=self.state.step)

    def _finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.output_dir / "final"
        if acc.is_main_process:
            self.ema_model.save_pretrained(final)
            if self.ema is not None:
                self.model.save_pretrained(final / "raw")
            (final / "training_config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
            self.write_images("final")
        if acc.log_with:
            acc.end_training()
        acc.wait_for_everyone()
        return final

    # ---- images ------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_images(self, name: str) -> None:
        """Write real | reconstruction and prior-sample grids (EMA generator) as PNGs."""
        if not self.accelerator.is_main_process:
            return
        from torchvision.utils import save_image

        model = self.ema_model
        was_training = model.training
        model.eval()
        low, high = model.value_range
        real = self._fixed_real
        recon = model.reconstruct(real)
        pairs = torch.stack([real, recon], dim=1).flatten(0, 1)  # (2N, C, H, W): real, recon, real, ...
        samples = model.decode(self._fixed_noise)
        out = self.output_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        save_image(pairs.float(), out / f"{name}_reconstructions.png", nrow=16, normalize=True, value_range=(low, high))
        save_image(samples.float(), out / f"{name}_samples.png", nrow=8, normalize=True, value_range=(low, high))
        model.train(was_training)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a complete, resumable checkpoint (every process must call this)."""
        extra = {"trainer_state.json": lambda p: p.write_text(json.dumps(asdict(self.state)))}
        if self.ema is not None:
            ema_state = {k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}
            extra["ema.safetensors"] = lambda p: save_file(ema_state, str(p))
        extra["config.yaml"] = lambda p: p.write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
        return self.checkpoints.save(self.accelerator, self.state.step, extra, {"epoch": self.state.epoch})

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizers, schedulers, scaler, RNG, EMA and counters from ``path``.

        Raises:
            CheckpointError: a file is corrupt, truncated or from another architecture.
        """
        try:
            self.accelerator.load_state(str(path))
            self.state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
            if self.ema is not None:
                ema_file = path / "ema.safetensors"
                if ema_file.is_file():
                    self.ema.load_state_dict(load_file(str(ema_file), device=str(self.accelerator.device)))
                else:
                    logger.warning("%s has no EMA weights; the EMA restarts from the current weights.", path)
        except CheckpointError:
            raise
        except Exception as exc:  # corrupt pickles, truncated safetensors, shape mismatches, bad JSON
            raise CheckpointError(
                f"Checkpoint '{path}' cannot be restored: {type(exc).__name__}: {exc}. It may be truncated, "
                "corrupt, or saved with a different model/loss configuration; resume from another checkpoint "
                "(they are kept under <output-dir>/checkpoints) or start a new output directory."
            ) from exc
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                    self.state.epoch, self.state.batch_in_epoch)


def _flatten(data: dict, prefix: str = "") -> Dict[str, object]:
    flat: Dict[str, object] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return flat
