"""The training loop around :class:`~vaegan.step.TrainStep`: logging, images, checkpoints, evaluation,
signals and callbacks.

Everything the loop uses is built before it (:func:`vaegan.build_trainer`) and injected, so a test or a
benchmark can hand it any step, loader, tracker or callback. Data flows one way: batches -> the step
(both players, device tensors out) -> :class:`RunningMeans` (host reads only at log intervals) ->
``metrics.jsonl`` and the trackers; checkpoints and evaluations at their intervals.

Example:
    >>> trainer = vaegan.build_trainer(cfg, callbacks=[MyCallback()])  # doctest: +SKIP
    >>> final_dir = trainer.fit()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import yaml
from safetensors.torch import save_file

from . import latent_stats
from ._deprecation import deprecated_names
from ._trainer_compat import legacy_components, moved_to_step
from .callbacks import Callback, CallbackList
from .checkpointing import MARKER, CheckpointManager, name_step, read_counters, read_marker, resolve_resume, restore
from .config import ExperimentConfig, to_dict
from .data import first_batch, image_of, resume_batches
from .errors import CheckpointError, DataError, TrainingDiverged
from .export import save_discriminator, write_model_card
from .faults import Boundary, SoftWrites, clean_data_error, out_of_memory, writing_final
from .files import dumps_json, write_text_atomic
from .generator import VAE
from .guards import CollapseMonitor, all_finite
from .plots import write_loss_curves
from .preemption import RunControl
from .previews import write_previews
from .progress import Progress
from .run_folder import RunFolder
from .samplers import LatentSampler, fit_after_training, fit_configured, load_sampler, saved_samplers
from .step import RunningMeans, StepOutput, TrainStep  # RunningMeans: also public here, as in 0.1
from .tracking import Tracking

if TYPE_CHECKING:  # evaluation pulls in torchmetrics (~2 s): imported when the run evaluates
    from .evaluation import EvalResources

__all__ = ["TrainState", "RunningMeans", "Trainer"]

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters that, with the weights, optimizers and RNG, make a resume exact."""

    step: int = 0  # optimizer steps taken (one skipped for NaN/inf included: it changed no weight)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    images_seen: int = 0  # across all processes
    skipped_steps: int = 0  # steps skipped for both players because a value was NaN/inf


class Trainer:
    """Runs :class:`~vaegan.step.TrainStep` over a data loader until ``max_steps`` or ``epochs``.

    Args:
        config: The run's configuration (its ``train`` and ``eval`` sections drive the loop).
        train_step: The two-player step, with its prepared players.
        loader: The prepared data loader (batches of (B, C, H, W) images, or (images, labels)).
        total_steps: Optimizer steps of the run (the schedules were resolved with it).
        callbacks: :class:`~vaegan.callbacks.Callback` objects called at each point of the loop.
        tracking: The W&B / TensorBoard trackers (default: from ``config.train``).
        evaluation: Data and networks for ``eval.every`` (default: loaded at the first evaluation).

    Example:
        >>> trainer = vaegan.build_trainer(cfg)  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, config: ExperimentConfig, train_step: TrainStep, loader: Any, total_steps: Any = None,
                 *legacy: Any, callbacks: Sequence[Callback] = (), tracking: Optional[Tracking] = None,
                 evaluation: Optional[EvalResources] = None) -> None:
        if not isinstance(train_step, TrainStep):  # vaegan 0.1: Trainer(config, model, objective, dataset, ...)
            train_step, loader, total_steps, evaluation = legacy_components(config, train_step, loader, total_steps,
                                                                            *legacy)
        self.config = config
        self.train_step = train_step
        self.loader = loader
        self.total_steps = int(total_steps)
        self.accelerator = train_step.accelerator
        self.output_dir = Path(config.train.output_dir)
        self.callbacks = CallbackList(callbacks)
        self.tracking = tracking or Tracking(self.accelerator, config.train.project, self.output_dir)
        self.checkpoints = CheckpointManager(self.output_dir, config.train.checkpoints_total_limit)
        self.state = TrainState()
        self.history: List[Dict[str, float]] = []
        self.means = RunningMeans()
        self.collapse = CollapseMonitor()
        self._eval = evaluation
        self._last_eval, self._last_results = -1, {}
        self.sampler: Optional[LatentSampler] = None  # config.sampler, once fitted at the end of training
        self._stop_requested = False
        self._last_saved = -1  # the step of the newest checkpoint this run wrote or resumed from
        self._control: Optional[RunControl] = None  # while fit() runs
        self._progress: Optional[Progress] = None
        self.soft_writes = SoftWrites()  # sample grids, metrics.jsonl, eval.jsonl: warn once and go on
        # The output folder's lock (vaegan.run_folder), taken by build_trainer and released when fit() ends.
        self.run_folder: Optional[RunFolder] = None

    @property
    def model(self) -> VAE:
        """The raw (non-EMA) generator being trained."""
        return self.train_step.model

    @property
    def ema_model(self) -> VAE:
        """The EMA generator (or the raw one when EMA is off), for sampling."""
        ema = self.train_step.ema
        return ema.module if ema is not None else self.model  # type: ignore[return-value]

    def stop(self) -> None:
        """End training after the current step, as if ``max_steps`` were reached (a callback may call it):
        a checkpoint and ``final/`` are written as usual."""
        self._stop_requested = True

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train until ``max_steps``, ``epochs`` or :meth:`stop`; returns ``<output-dir>/final``.

        A signal (SIGINT, SIGTERM, the scheduler's ``train.warning_signal``) or ``train.max_time`` stops the
        run after the current step with a checkpoint, on every process at the same step
        (:mod:`vaegan.preemption`), and raises :class:`~vaegan.errors.TrainingStopped`, a ``SystemExit``
        with status 130/143 (128 + the signal) or 124 (``max_time``); ``train.resume=auto`` continues.

        Raises:
            CheckpointError: ``train.resume`` names no usable checkpoint.
            TrainingDiverged: ``train.max_nonfinite_steps`` steps in a row were NaN/inf.
            TrainingStopped: stopped early, with a checkpoint of the step reached.
        """
        try:
            return self._fit()
        finally:
            if self.run_folder is not None:
                self.run_folder.release()

    def _fit(self) -> Path:
        acc, tc = self.accelerator, self.config.train
        with RunControl(tc, acc, self.train_step.guard, self.loader) as self._control:
            self._last_saved = self._start()  # a resume replaces self.state
            with Progress(self.total_steps, self.state.step, tc.progress, tc.progress_seconds,
                          enabled=acc.is_local_main_process) as self._progress:
                try:
                    self._epochs()
                except (DataError, torch.OutOfMemoryError) as exc:  # a file vanished, the memory ran out
                    raise self.save_after_fault(exc) from exc
                if self._logged != self.state.step:  # stopped by a callback between log intervals: log the tail
                    self._log()
            if self._last_saved != self.state.step:
                self.save_checkpoint()
            return self._finish()

    def _epochs(self) -> None:
        """The loop over epochs and batches, until ``total_steps``, ``epochs`` or :meth:`stop`."""
        acc, state, tc = self.accelerator, self.state, self.config.train
        self._boundary = Boundary(self.train_step.players()).take(state)
        while state.step < self.total_steps and state.epoch < tc.epochs and not self._stop_requested:
            self.loader.set_epoch(state.epoch)
            batches = self.loader  # mid-epoch after a resume: the batches this epoch has not seen yet
            if state.batch_in_epoch:
                batches = resume_batches(acc, self.loader, state.epoch, state.batch_in_epoch)
                self._control.loaders.append(batches)  # its workers end with training too
            for batch in batches:
                x = image_of(batch)  # (B, C, H, W); labels dropped
                self.callbacks.on_batch_start(self, x)
                out = self.train_step(x, state.step)
                state.batch_in_epoch += 1
                state.images_seen += x.shape[0] * acc.num_processes
                self.callbacks.on_batch_end(self, out)
                if out is not None:  # an optimizer step of both players (applied, or skipped on the device)
                    state.step += 1
                    self._progress.update(1)
                    self._last_saved = self._after_step(out, self._last_saved)
                    self._boundary.take(state)  # what a fault in the next step saves
                if state.step >= self.total_steps or self._stop_requested:
                    return
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def _start(self) -> int:
        """Resume (``train.resume``), write the run's config, start the trackers; returns the step last saved."""
        acc, tc = self.accelerator, self.config.train
        resume = resolve_resume(self.output_dir, tc.resume)
        if resume is not None:
            self.load_checkpoint(resume)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.output_dir / "config.yaml", yaml.safe_dump(to_dict(self.config), sort_keys=False))
            self._fixed_real = first_batch(self.loader.dataset, tc.num_samples).to(acc.device)
            self._fixed_noise = self.model.sample_prior(
                tc.num_samples, generator=torch.Generator().manual_seed(tc.seed)).to(acc.device)
        threads = torch.get_num_threads()
        where = f"{acc.device}, {threads} thread{'s' * (threads != 1)}" if acc.device.type == "cpu" else str(acc.device)
        logger.info("Training %d steps with mixed precision %s on %d process(es) (%s), %d images per step",
                    self.total_steps, acc.mixed_precision, acc.num_processes, where,
                    tc.batch_size * acc.num_processes * tc.grad_accum)
        self.tracking.start(self.config)
        self._t0, self._images0, self._logged = time.perf_counter(), self.state.images_seen, self.state.step
        self.callbacks.on_train_start(self)
        return self.state.step if resume is not None else -1  # a resumed run starts from a saved state

    def _after_step(self, out: StepOutput, last_saved: int) -> int:
        """Everything the loop does after an optimizer step; returns the step of the last checkpoint.

        Raises:
            TrainingStopped: a signal or ``max_time`` stopped the run (after this step's checkpoint).
        """
        tc, step = self.config.train, self.state.step
        decision = self._control.after_step()
        self.means.add(out.metrics, out.found_inf)
        if step % tc.log_every == 0 or step == self.total_steps or decision.stop:
            self._log()
        if tc.sample_every and step % tc.sample_every == 0:
            self.write_images(f"step_{step:08d}")
        if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or decision.save or decision.stop:
            self.save_checkpoint()
            last_saved = step
        if decision.stop:
            self.tracking.finish()
            raise self._control.stop(decision.stop, step)
        if self.config.eval.every and step % self.config.eval.every == 0:
            self.evaluate()
        self.callbacks.on_step_end(self, out)
        return last_saved

    def _sync_guard(self) -> None:
        """Count the skipped steps since the last sync (raises TrainingDiverged after too many in a row)."""
        self.state.skipped_steps += self.train_step.guard.sync(self.state.step)

    def _log(self) -> None:
        """The log interval: the one host read of the step metrics and the guard's counters."""
        acc = self.accelerator
        self._sync_guard()
        metrics = self.means.compute(acc)
        objective, step = self.train_step.objective, self.state.step
        for key in objective.schedules:
            metrics[f"weight/{key}"] = objective.weight(key, step)
        metrics["lr/g"] = self.train_step.generator.scheduler.get_last_lr()[0]
        if self.train_step.discriminator is not None:
            metrics["lr/d"] = self.train_step.discriminator.scheduler.get_last_lr()[0]
        now = time.perf_counter()
        metrics["images_per_sec"] = (self.state.images_seen - self._images0) / max(now - self._t0, 1e-9)
        metrics["epoch"] = self.state.epoch
        metrics["skipped_steps"] = self.state.skipped_steps
        if getattr(self.loader.dataset, "skip_unreadable", False):  # image reads that failed and were skipped
            metrics["data/unreadable_images"] = self.loader.dataset.unreadable.value
        self._t0, self._images0, self._logged = now, self.state.images_seen, step
        if acc.is_main_process:
            self.collapse.update(step, metrics)  # warns on discriminator domination
            record = {"step": step, **metrics}
            self.history.append(record)
            self.soft_writes.append_line("metrics log (metrics.jsonl)", self.output_dir / "metrics.jsonl", record)
            self._progress.report(step, metrics)
        self.tracking.log(metrics, step)
        self.callbacks.on_log(self, metrics)

    def _finish(self) -> Path:
        acc, cfg = self.accelerator, self.config
        final = self.output_dir / "final"
        acc.wait_for_everyone()
        # Latent statistics on every process (each encodes its share of the images; the sums are all-reduced).
        stats, notes = latent_stats.estimate_and_store((self.ema_model, self.model), self.loader.dataset,
                                                       cfg.train.estimate_scaling_factor, accelerator=acc)
        if acc.is_main_process:
            with writing_final(final, self.checkpoints.root):  # a failed write leaves no half-written final/
                self.ema_model.save_pretrained(final)
                if stats is not None:
                    latent_stats.save_latent_stats(stats, final / latent_stats.LATENT_STATS_FILE)
                if self.train_step.ema is not None:
                    self.model.save_pretrained(final / "raw")
                if self.train_step.disc_net is not None:
                    save_discriminator(self.train_step.disc_net, cfg, final)
                write_text_atomic(final / "training_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
                if cfg.sampler is not None:  # fitted to the EMA generator's posterior means, saved next to it
                    note = fit_after_training(self.ema_model, self.loader.dataset, cfg, final)
                    notes += (note,) if note else ()
        acc.wait_for_everyone()
        if cfg.sampler is not None and cfg.sampler.name in saved_samplers(final):  # every process
            self.sampler = load_sampler(final, cfg.sampler.name, self.ema_model.latent_shape)
        results = None
        if cfg.eval.every:
            fresh = self._last_eval != self.state.step or self.sampler is not None
            results = self.evaluate() if fresh else self._last_results
        if acc.is_main_process:
            with writing_final(final, self.checkpoints.root):
                if results is not None:
                    write_text_atomic(final / "eval.json", dumps_json(results, indent=2) + "\n")
                write_model_card(final, cfg, self.ema_model, self.state.step, self.state.images_seen, results, notes)
            self.write_images("final")
            if self.config.train.plot_loss_curves:
                write_loss_curves(self.output_dir)  # loss_curves.png; warns instead of raising
        self.tracking.finish()  # not end_training(): that also destroys the process group
        acc.wait_for_everyone()
        self.callbacks.on_train_end(self, final)
        return final

    # ---- evaluation, images --------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, object]:
        """Evaluate the EMA generator (``eval.ema``) with the ``eval`` config on every process; generated images
        come from the run's ``sampler``, fitted to the current generator for each evaluation before the end.

        Scalars go to the trackers as ``eval/<metric>`` and every result, with its step, is appended to
        ``<output_dir>/eval.jsonl``. Every process must call this (the metric states are reduced).
        """
        from .evaluation import evaluate, prepare_evaluation

        ec = self.config.eval
        self._sync_guard()  # no evaluation of a diverged run
        if self._eval is None:
            self._eval = prepare_evaluation(self.config.data, self.model.config, ec, accelerator=self.accelerator)
        model = self.ema_model if ec.ema else self.model
        t0 = time.perf_counter()
        sampler = self.sampler
        if sampler is None and self.config.sampler is not None:  # the sampler the run ends with, fitted for now
            fitted = fit_configured(model, self.loader.dataset, self.config)  # deterministic: alike on every rank
            sampler = fitted[0] if fitted is not None else None
        results = evaluate(model, self._eval.data, ec, resources=self._eval, accelerator=self.accelerator,
                           sampler=sampler, progress=self.config.train.progress != "off")
        logger.info("Evaluation at step %d took %.1f s: %s", self.state.step, time.perf_counter() - t0,
                    ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float)))
        if self.accelerator.is_main_process:
            self.soft_writes.append_line("evaluation log (eval.jsonl)", self.output_dir / "eval.jsonl",
                                         {"step": self.state.step, **results})
        self.tracking.log({f"eval/{k}": float(v) for k, v in results.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}, self.state.step)
        self._last_eval, self._last_results = self.state.step, results
        return results

    def write_images(self, name: str) -> None:
        """Write real | reconstruction pairs, prior samples (captioned; none for a spatial latent without a
        sampler) and interpolation strips of the EMA generator as ``samples/<name>_<panel>.png``, and log the
        same panels to the trackers."""
        if not self.accelerator.is_main_process:
            return
        sampled = {}
        if self.sampler is not None:  # the fitted sampler's latents, next to the prior's
            gen = torch.Generator().manual_seed(self.config.train.seed)
            sampled[self.sampler.name] = self.sampler.sample(self._fixed_noise.shape[0], generator=gen)
        # A spatial latent with no sampler is sampled by a diffusion model, not its prior: N(0, I) decodes to noise,
        # so no prior-sample grid is written for it.
        prior = len(self.ema_model.latent_shape) == 1 or self.config.sampler is not None
        noise = self._fixed_noise if prior else None
        args = (self.output_dir / "samples", name, self.ema_model, self._fixed_real, noise, sampled)
        self.soft_writes("sample grids", lambda: self.tracking.log_images(write_previews(*args), self.state.step))

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_after_fault(self, exc: BaseException) -> Exception:
        """After a :class:`DataError` or out-of-memory in the middle of the loop: save the last completed step as
        if the failed one had never started (:class:`~vaegan.faults.Boundary`), and return the one-paragraph
        error to raise.

        Raises:
            OutputError: the save failed too (no space either); its message names the last complete checkpoint.
        """
        self._boundary.restore(self.state)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # room for the save after an out-of-memory
        step = self.state.step
        if self._last_saved != step and step > 0:
            self.save_checkpoint()
            saved = f"The last completed step, {step}, is saved under {self.checkpoints.root}."
        else:
            saved = f"Step {step} is the last checkpoint already." if step else "No step was completed."
        if isinstance(exc, DataError):
            return DataError(f"{clean_data_error(exc)} {saved} Fix the data, then continue with --resume auto.")
        return out_of_memory(exc, self.config, step, saved)

    def save_checkpoint(self) -> Path:
        """Save a complete, resumable checkpoint (every process must call this).

        Raises:
            TrainingDiverged: too many skipped steps in a row, or the weights are not finite (the existing
                checkpoints are kept).
        """
        self._sync_guard()  # the saved counters include every skipped step
        ema = self.train_step.ema
        if not all_finite([*self.train_step.players(), ema]):
            raise TrainingDiverged(
                f"Refusing to save step {self.state.step}: the weights contain NaN or inf. The checkpoints already "
                f"under {self.checkpoints.root} are kept; resume from the newest with lower learning rates.")
        extra = {"trainer_state.json": lambda p: p.write_text(json.dumps(asdict(self.state)))}
        if ema is not None:
            ema_state = {k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}
            extra["ema.safetensors"] = lambda p: save_file(ema_state, str(p))
        extra["config.yaml"] = lambda p: p.write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
        t0 = time.perf_counter()
        layout = {"epoch": self.state.epoch, "images_per_batch": self.config.train.batch_size * self.accelerator.num_processes,
                  "grad_accum": self.config.train.grad_accum}  # what a resume checks the data position against
        path = self.checkpoints.save(self.accelerator, self.state.step, extra, layout)
        if self._control is not None:  # the time a save takes is kept free before train.max_time
            self._control.saved(time.perf_counter() - t0)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizers, schedulers, scaler, RNG, EMA and counters from ``path``.

        Every file is checked first (safetensors headers, ``weights_only`` pickles, shapes), and the live
        objects are put back if the load still fails: a failed resume never leaves a half-loaded trainer.

        Raises:
            CheckpointError: naming the file that is missing, corrupt, unsafe or from another architecture.
        """
        path, step = Path(path), self.train_step
        state = TrainState(**read_counters(path / "trainer_state.json", list(asdict(TrainState()))))
        state = self._check_position(path, state)
        extra = {"ema.safetensors": step.ema} if step.ema is not None and (path / "ema.safetensors").is_file() else {}
        if step.ema is not None and not extra:
            logger.warning("%s has no EMA weights; the EMA restarts from the current weights.", path)
        players = [step.generator] + ([step.discriminator] if step.discriminator is not None else [])
        restore(self.accelerator, path, step.players(), [p.optimizer for p in players],  # prepare order
                [p.scheduler for p in players], extra)
        self.state = state
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                    self.state.epoch, self.state.batch_in_epoch)

    def _check_position(self, path: Path, state: TrainState) -> TrainState:
        """The counters of ``path`` cross-checked against its marker and name, and the data position carried over
        in images when the batch layout changed.

        Raises:
            CheckpointError: the marker, the folder name and ``trainer_state.json`` disagree on the step, or the
                position lies beyond the data.
        """
        marker, named = read_marker(path) or {}, name_step(path)
        steps = {"trainer_state.json": state.step, MARKER: marker.get("step", state.step)}
        if named is not None:
            steps["the folder's name"] = named
        if len(set(steps.values())) > 1:
            said = ", ".join(f"{k} says step {v}" for k, v in steps.items())
            raise CheckpointError(f"Checkpoint '{path}' contradicts itself: {said}. It was edited or damaged; resuming "
                                  "it could train over a good checkpoint. Resume from another folder under "
                                  "<output-dir>/checkpoints (--resume PATH).")
        tc, world = self.config.train, self.accelerator.num_processes
        before, now = marker.get("images_per_batch"), tc.batch_size * world
        into_epoch = state.batch_in_epoch * (before or now)  # images of the current epoch already seen
        if into_epoch > len(self.loader.dataset):
            raise CheckpointError(f"Checkpoint '{path}' says it is {state.batch_in_epoch} batches ({into_epoch} images) "
                                  f"into an epoch, but the data has {len(self.loader.dataset)} images: it belongs to "
                                  "other data or is damaged. Resume from another checkpoint, or start afresh.")
        if before is not None and before != now:
            batch = into_epoch // now
            logger.warning("Resuming with %d images per batch (train.batch_size %d x %d processes) where %s was saved "
                           "with %d: the epoch continues at image %d (batch %d of the new size), the step count and "
                           "the schedules as saved.", now, tc.batch_size, world, path, before, batch * now, batch)
            state = TrainState(**{**asdict(state), "batch_in_epoch": batch})
        if marker.get("grad_accum", tc.grad_accum) != tc.grad_accum:
            logger.warning("Resuming with train.grad_accum %d where %s was saved with %d: each step now averages "
                           "another number of batches.", tc.grad_accum, path, marker["grad_accum"])
        return state

    # ---- vaegan 0.1 attributes -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only reached for names the trainer does not have: the players, optimizers and step methods that
        # moved to TrainStep keep working, with a warning that names their new place.
        if name == "train_step" or "train_step" not in self.__dict__:
            raise AttributeError(f"'Trainer' object has no attribute '{name}'")
        return moved_to_step(self, name)


# vaegan 0.1 called the player wrapper vaegan.trainer.Player, a name the plugin API also uses (a Literal).
__getattr__ = deprecated_names(__name__, {"Player": "vaegan.step:PlayerModule"})
